"""bench/run.py and bench/snapshots.py in smoke mode, so the benchmarks never rot.  No timing is
asserted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "run.py"
SNAPSHOTS = BENCH.parent / "snapshots.py"

WORKLOADS = [
    "seqwrite_nofsync",
    "seqwrite_fsync",
    "seqread_cold",
    "seqread_warm",
    "randread4k",
    "randread4k_4jobs",
    "randwrite4k",
    "randwrite4k_4jobs",
    "smallfiles",
    "listdir_cold",
    "listdir_warm",
    "sqlite_rollback",
    "sqlite_wal",
    "untar",
    "git_add_commit",
    "tar_read_cold",
    "find_stat_cold",
    "sqlite_1row_wal",
    "sqlite_1row_rollback",
    "rm_rf",
]
REALWORK = WORKLOADS[-7:]

needs_fio = pytest.mark.skipif(
    shutil.which("fio") is None, reason="fio is not installed (install.sh --dev)"
)


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/mounts", encoding="utf-8") as fh:
        return [f[1] for f in (line.split() for line in fh) if f[1].startswith(f"{path}/")]


def _processes_mentioning(text: str) -> list[str]:
    """Processes whose command line or environment names text (our work dir)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            blob = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:
            continue
        if text.encode() in blob:
            found.append(f"{proc.name}: {(proc / 'cmdline').read_bytes()[:200]!r}")
    return found


def _bench(tmp_path: Path, *args: str, env: dict[str, str] | None = None, script: Path = BENCH):
    out = tmp_path / "smoke.json"
    work = tmp_path / "work"
    done = subprocess.run(
        [sys.executable, str(script), "--smoke", "--workdir", str(work), "--json", str(out), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert not _mounts_under(work), "the benchmark left mounts behind"
    assert not _processes_mentioning(str(work)), "the benchmark left processes behind"
    return done, json.loads(out.read_text())


PEERS = ("bindfs", "rclone", "juicefs")
#: What the default suite runs on the peers: a fio workload and a real-work one.
PEER_WORKLOADS = ["randwrite4k", "sqlite_1row_wal"]


def _check_targets(done, results, targets: tuple[str, ...], workloads: list[str]) -> None:
    """Each of *targets* ran each of *workloads*, or (a peer only) is reported missing."""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert results["config"]["workloads"] == workloads
    ran = {(r["target"], r["workload"]) for r in results["runs"]}
    for target in targets:
        info = results["targets"][target]
        if info["status"] == "missing":  # the peers may not be installed (or installable)
            assert target in PEERS and info["reason"]
            assert f"{target}: missing" in done.stdout
            continue
        assert info["status"] == "ok", info
        assert {w for t, w in ran if t == target} == set(workloads), target
    for row in results["summary"]:
        assert row["median"] > 0 and row["ratio"] is not None, row


@needs_fio
def test_bench_smoke_of_the_peers(tmp_path):
    """bindfs, rclone and JuiceFS each run a fio and a real-work workload (or are reported
    missing); the slow test runs every workload on them."""
    targets = ("native", "volfs", *PEERS)
    done, results = _bench(
        tmp_path,
        *("--targets", ",".join(targets), "--workloads", ",".join(PEER_WORKLOADS)),
        *("--scale", "none"),
    )
    _check_targets(done, results, targets, PEER_WORKLOADS)


@pytest.mark.slow
@needs_fio
def test_bench_smoke_every_target(tmp_path):
    """Every workload on every target."""
    targets = ("native", "volfs", *PEERS)
    done, results = _bench(tmp_path, "--targets", ",".join(targets), "--scale", "none")
    _check_targets(done, results, targets, WORKLOADS)


@needs_fio
def test_bench_smoke(tmp_path):
    """Every workload on native and volfs, and the scale part, with tiny sizes; on volfs, the
    worker's request counts per operation of each workload."""
    done, results = _bench(tmp_path, "--targets", "native,volfs")
    _check_targets(done, results, ("native", "volfs"), WORKLOADS)
    assert "ratio-to-native" in done.stdout and "sqlite_wal" in done.stdout

    tree = results["realwork_tree"]
    assert (
        tree["files"] > 0
        and tree["bytes"] > 0
        and tree["sources"] == results["config"]["tree_sources"]
    )
    for run in results["runs"]:
        if run["target"] != "volfs":
            assert run.get("requests") is None, run
            continue
        counts = run["requests"]
        assert counts["requests"] > 0 and counts["per_operation"] > 0, run
        assert sum(counts["by_kind"].values()) == counts["requests"], run
    counted = {r["workload"]: r for r in results["requests"]}
    assert set(counted) == set(WORKLOADS)
    assert counted["sqlite_1row_wal"]["by_kind_per_operation"]["fsync"] > 0
    assert counted["untar"]["by_kind_per_operation"]["create"] >= 1
    assert "req/txn: " in done.stdout and "req/file: " in done.stdout
    for name in REALWORK:
        assert name in done.stdout

    small = next(r for r in results["runs"] if r["workload"] == "smallfiles")
    assert {"create_per_s", "stat_per_s", "read_per_s", "unlink_per_s"} <= small.keys()
    machine = results["machine"]
    assert machine["kernel"] and machine["cpu_count"] and machine["python"]

    scale = results["scale"]
    assert scale["status"] == "ok", scale
    assert [r["files"] for r in scale["results"]] == scale["sizes"] and len(scale["sizes"]) >= 2
    for record in scale["results"]:
        assert record["mount_s"]["median"] > 0
        assert record["cycle_us"]["median"] > 0 and record["stat_cold_us"]["median"] > 0
        assert record["peak_rss_mib"]["median"] > 0
    assert "files in volume" in done.stdout and "peak RSS MiB" in done.stdout


@needs_fio
def test_bench_reports_missing_peers(tmp_path):
    """Without bindfs and rclone on PATH the run still completes and says they are missing."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("fio", "fusermount3", "pkg-config", "git"):
        if path := shutil.which(tool):
            (bindir / tool).symlink_to(path)
    env = {**os.environ, "PATH": str(bindir)}
    done, results = _bench(
        tmp_path,
        *("--targets", "native,bindfs,rclone", "--workloads", "seqwrite_fsync", "--scale", "none"),
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for target in ("bindfs", "rclone"):
        assert results["targets"][target]["status"] == "missing"
        assert "not installed" in results["targets"][target]["reason"]
        assert f"{target}: missing" in done.stdout
    assert [r["target"] for r in results["runs"]] == ["native"]


def test_snapshots_bench_smoke(tmp_path):
    """Each verb at each of three tiny sizes, and many snapshots of one volume, mounted too."""
    done, results = _bench(tmp_path, "--count", "12", script=SNAPSHOTS)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [c["label"] for c in results["cases"]] == ["1 MiB", "4 MiB", "1000 files"]
    for case in results["cases"]:
        for key in ("snapshot_unmounted_s", "snapshot_loaded_s", "load_s", "clone_s",
                    "rollback_s", "rm_snapshot_s", "snapshot_mounted_cli",
                    "snapshot_mounted_request"):  # fmt: skip
            assert len(case[key]["samples"]) == results["config"]["repeats"] or key == "load_s"
            assert case[key]["median"] > 0, (case["label"], key)
        assert case["snapshot_checkpoint_bytes"] > 0 and case["snapshot_segments"] >= 1
    many = results["many"]
    assert many["count"] == 12 and len(many["take_s"]["samples"]) == 12
    assert many["du"]["volume_after"] > many["du"]["volume_before"] > 0
    for served in ("served_without", "served_with"):
        assert many[served]["mount_s"] > 0
        assert many[served]["before"]["worker"]["VmRSS"] > 0
        assert many[served]["after"]["daemon"]["VmRSS"] > 0
    assert len(many["served_with"]["take_s"]["samples"]) == 12
    assert "snapshot, unmounted ms" in done.stdout and "disk per snapshot" in done.stdout


@needs_fio
@pytest.mark.skipif(shutil.which("rclone") is None, reason="rclone is not installed")
def test_bench_tree_steps_not_run_without_symlinks(tmp_path):
    """rclone's mount holds no symlinks: on it the real-work tree steps are reported as not
    run (the run still succeeds) and its SQLite steps still run."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a.py").write_text("print('a')\n")
    (tree / "link.py").symlink_to("sub/a.py")
    done, results = _bench(
        tmp_path,
        *("--targets", "native,rclone", "--workloads", "untar,sqlite_1row_wal,rm_rf"),
        *("--tree", str(tree), "--scale", "none"),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert results["realwork_tree"]["symlinks"] == 1 and results["realwork_tree"]["files"] == 1
    rclone = results["targets"]["rclone"]
    assert rclone["status"] == "ok" and set(rclone["unsupported"]) == {"untar", "rm_rf"}
    ran = {(r["target"], r["workload"]) for r in results["runs"]}
    assert ran == {("native", "untar"), ("native", "sqlite_1row_wal"), ("native", "rm_rf"),
                   ("rclone", "sqlite_1row_wal")}  # fmt: skip
    assert "rclone: not run: rclone cannot hold the tree's 1 symlinks" in done.stdout
