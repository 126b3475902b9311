#!/usr/bin/env python3
"""Benchmark volfs against the native disk and other FUSE file systems.

Absolute numbers from small, shared VMs swing by tens of percent between runs,
so every target is measured in the same run as a plain directory on the same
disk and the result that matters is the ratio of medians to that baseline.
A second part (scale.py) measures how volfs's costs grow with the number of
files in a volume.

    python bench/run.py                      # everything, defaults; see bench/README.md
    python bench/run.py --smoke              # tiny sizes: checks the harness in ~30 s
    python bench/run.py --workloads none --scale 10k,100k     # only the scale table

Exit status: 0 when the run completed (targets that could not be set up are
reported as "missing" but do not fail the run), 1 when a workload failed on a
target that was set up, 2 when a mount could not be removed, 130 on interrupt.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import realwork
import requestcount
import scale
import workloads
from targets import (
    REPO_ROOT,
    TARGET_CLASSES,
    JuicefsTarget,
    MountTarget,
    RcloneTarget,
    Target,
    TargetMissing,
    Unsupported,
    VolfsTarget,
    force_unmount,
    is_mounted,
    mounts_under,
)

BENCH_DIR = Path(__file__).resolve().parent
MIB = 1024 * 1024

# In the order a pass runs them: each one depends on the cache state the previous left.
WORKLOADS = (
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
    *realwork.WORKLOADS,
)
UNITS = {
    "seqwrite_nofsync": "MB/s",
    "seqwrite_fsync": "MB/s",
    "seqread_cold": "MB/s",
    "seqread_warm": "MB/s",
    "randread4k": "IOPS",
    "randread4k_4jobs": "IOPS",
    "randwrite4k": "IOPS",
    "randwrite4k_4jobs": "IOPS",
    "smallfiles": "files/s",
    "listdir_cold": "entries/s",
    "listdir_warm": "entries/s",
    "sqlite_rollback": "txn/s",
    "sqlite_wal": "txn/s",
    **realwork.UNITS,
}
FIO_WORKLOADS = WORKLOADS[:8]
# Workloads that need the SIZE test file to exist; they run after seqwrite_fsync made it.
FILE_WORKLOADS = FIO_WORKLOADS[2:]
ALL_TARGETS = ("native", "volfs", "bindfs", "rclone", "juicefs")

DEFAULTS = {
    "size": 1024 * MIB,
    "runtime": 10.0,
    "repeats": 3,
    "files": 10_000,
    "entries": 100_000,
    "txns": 200,
    "rows": 50,
    "one_row_txns": 1000,
    "tree": list(realwork.DEFAULT_SOURCES),
    "scale": [10_000, 100_000, 1_000_000],
    "scale_ops": 10_000,
}
SMOKE = {
    "size": 8 * MIB,
    "runtime": 0.5,
    "repeats": 1,
    "files": 100,
    "entries": 500,
    "txns": 5,
    "rows": 50,
    "one_row_txns": 5,
    "tree": list(realwork.SMOKE_SOURCES),
    "scale": [300, 1000],
    "scale_ops": 100,
}

#: fio's block sizes here, in bytes: an I/O is one block.
BLOCK_BYTES = {"1M": MIB, "4k": 4096}
DATA_FILE = "fio.dat"
NOFSYNC_FILE = "fio-nofsync.dat"
LISTDIR = "listdir"


# --------------------------------------------------------------------------- workloads


def run_fio(
    name: str,
    filename: Path,
    rw: str,
    bs: str,
    size: int,
    logdir: Path,
    *,
    runtime: float | None = None,
    end_fsync: bool = False,
    invalidate: bool = False,
    numjobs: int = 1,
    target: Target | None = None,
) -> dict[str, Any]:
    """One buffered psync fio job (numjobs>1: that many, reported as one); JSON record + argv,
    and on a volfs *target* the requests per I/O it made (`requestcount`)."""
    out = logdir / f"fio-{name}.json"
    argv = [
        "fio",
        f"--name={name}",
        f"--filename={filename}",
        f"--rw={rw}",
        f"--bs={bs}",
        f"--size={size}",
        "--ioengine=psync",
        "--direct=0",
        "--iodepth=1",
        f"--numjobs={numjobs}",
        # fio preallocates by default, which turns seqwrite into an overwrite of
        # unwritten extents natively and is not supported by every FUSE fs.
        "--fallocate=none",
        # fio's default invalidate=1 would fadvise the file out of cache and turn
        # the "warm" reads cold; only the cold read wants that.
        f"--invalidate={int(invalidate)}",
        # The fsync is inside fio's measured runtime, so writes are timed to disk.
        f"--end_fsync={int(end_fsync)}",
        "--output-format=json",
        f"--output={out}",
    ]
    if numjobs > 1:
        # All jobs share the one file; one aggregate record, IOPS summed over jobs.
        argv.append("--group_reporting")
    if runtime is not None:
        argv += ["--time_based", f"--runtime={max(1, round(runtime * 1000))}ms"]
    logdir.mkdir(parents=True, exist_ok=True)
    with requestcount.counted(target) as window:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"fio {name} exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
    job = json.loads(out.read_text())["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio {name} error {job['error']}: {proc.stderr.strip()[-500:]}")
    job["argv"] = argv
    moved = sum(job[d]["io_bytes"] for d in ("read", "write"))
    job["requests"] = window.per(moved // BLOCK_BYTES[bs], "IO")
    return job


def fio_sample(job: dict[str, Any], direction: str, unit: str) -> dict[str, Any]:
    d = job[direction]
    clat = d.get("clat_ns", {})
    pct = clat.get("percentile", {})
    value = d["bw_bytes"] / 1e6 if unit == "MB/s" else d["iops"]
    return {
        "value": value,
        "io_bytes": d["io_bytes"],
        "runtime_ms": d["runtime"],
        "bw_bytes": d["bw_bytes"],
        "iops": d["iops"],
        "clat_mean_us": clat.get("mean", 0.0) / 1e3,
        "clat_p50_us": pct.get("50.000000", 0) / 1e3,
        "clat_p99_us": pct.get("99.000000", 0) / 1e3,
        "fio_argv": job["argv"],
        "requests": job.get("requests"),
    }


def seq_sample(job: dict[str, Any], direction: str, size: int) -> dict[str, Any]:
    """A sequential pass must move the whole file, or its MB/s describes something else."""
    sample = fio_sample(job, direction, "MB/s")
    if sample["io_bytes"] != size:
        raise RuntimeError(f"{job['jobname']} moved {sample['io_bytes']} of {size} bytes")
    return sample


Samples = Iterator[tuple[str, dict[str, Any]]]


def fio_group(target: Target, cfg: argparse.Namespace, wanted: set[str]) -> Samples:
    """The fio workloads: two fresh sequential writes, then reads and rewrites of the second."""
    logdir = cfg.workdir / "logs"
    data = target.path / DATA_FILE
    size = cfg.size
    if "seqwrite_nofsync" in wanted:
        scratch = target.path / NOFSYNC_FILE
        scratch.unlink(missing_ok=True)
        os.sync()
        job = run_fio("seqwrite_nofsync", scratch, "write", "1M", size, logdir, target=target)
        yield "seqwrite_nofsync", seq_sample(job, "write", size)
        scratch.unlink()
    if wanted & {"seqwrite_fsync", *FILE_WORKLOADS}:
        # A fresh file each time, so every repeat allocates the same way; the sync
        # first keeps the previous write's writeback out of this one's time.
        data.unlink(missing_ok=True)
        os.sync()
        job = run_fio("seqwrite_fsync", data, "write", "1M", size, logdir, end_fsync=True,
                      target=target)  # fmt: skip
        sample = seq_sample(job, "write", size)
        if "seqwrite_fsync" in wanted:
            yield "seqwrite_fsync", sample
    if wanted & set(FILE_WORKLOADS) and (actual := data.stat().st_size) != size:
        # Otherwise fio silently extends a short file and the reads look fine.
        raise RuntimeError(f"{data} is {actual} bytes after writing {size}")
    if "seqread_cold" in wanted:
        target.refresh()
        dropped = workloads.drop_caches()
        if (actual := data.stat().st_size) != size:
            raise RuntimeError(f"{data} is {actual} bytes after a remount, not {size}")
        job = run_fio("seqread_cold", data, "read", "1M", size, logdir, invalidate=True,
                      target=target)  # fmt: skip
        yield "seqread_cold", {**seq_sample(job, "read", size), "caches_dropped": dropped}
    if "seqread_warm" in wanted:
        os.sync()
        job = run_fio("seqread_warm", data, "read", "1M", size, logdir, target=target)
        yield "seqread_warm", seq_sample(job, "read", size)
    for rw, name in (("randread", "randread4k"), ("randwrite", "randwrite4k")):
        for jobs, workload in ((1, name), (4, f"{name}_4jobs")):
            if workload not in wanted:
                continue
            os.sync()
            job = run_fio(
                workload,
                data,
                rw,
                "4k",
                size,
                logdir,
                runtime=cfg.runtime,
                end_fsync=rw == "randwrite",
                numjobs=jobs,
                target=target,
            )
            yield workload, {**fio_sample(job, rw[4:], "IOPS"), "numjobs": jobs}
    data.unlink(missing_ok=True)


def smallfiles_group(target: Target, cfg: argparse.Namespace, wanted: set[str]) -> Samples:
    os.sync()
    with requestcount.counted(target) as window:
        sample = workloads.smallfiles(target.path / "smallfiles", cfg.files)
    yield "smallfiles", {**sample, "requests": window.per(cfg.files, "file")}


def prepare_listdir(target: Target, cfg: argparse.Namespace) -> dict[str, Any]:
    """Create the big directory once per target, untimed, before the first pass.

    Through the backing directory where the target has one (same files, much
    faster); volfs has none, so its entries are created through the mount.
    """
    base = target.backing_dir() or target.path
    seconds = workloads.populate_flat(base / LISTDIR, cfg.entries, cfg.workers)
    os.sync()
    return {"entries": cfg.entries, "seconds": seconds, "via": str(base)}


def listdir_group(target: Target, cfg: argparse.Namespace, wanted: set[str]) -> Samples:
    directory = target.path / LISTDIR
    if "listdir_cold" in wanted:
        target.refresh()
        dropped = workloads.drop_caches()
        with requestcount.counted(target) as window:
            sample = workloads.listdir(directory, cfg.entries)
        yield "listdir_cold", {**sample, "caches_dropped": dropped,
                               "requests": window.per(cfg.entries, "entry")}  # fmt: skip
    if "listdir_warm" in wanted:
        with requestcount.counted(target) as window:
            sample = workloads.listdir(directory, cfg.entries)
        yield "listdir_warm", {**sample, "requests": window.per(cfg.entries, "entry")}


def sqlite_group(target: Target, cfg: argparse.Namespace, wanted: set[str]) -> Samples:
    for mode, workload in (("delete", "sqlite_rollback"), ("wal", "sqlite_wal")):
        if workload in wanted:
            os.sync()
            db = target.path / f"bench-{mode}.db"
            with requestcount.counted(target) as window:
                sample = workloads.sqlite_inserts(db, mode, cfg.txns, cfg.rows)
            yield workload, {**sample, "requests": window.per(cfg.txns, "txn")}


# Independent groups: one failing does not keep the next from running.
GROUPS = (
    (FIO_WORKLOADS, fio_group),
    (("smallfiles",), smallfiles_group),
    (("listdir_cold", "listdir_warm"), listdir_group),
    (("sqlite_rollback", "sqlite_wal"), sqlite_group),
    (realwork.WORKLOADS, realwork.group),
)


def warm_up_disk(native_dir: Path, cfg: argparse.Namespace) -> float:
    """Touch SIZE worth of disk first: fresh virtual-disk blocks write slower once."""
    start = time.monotonic()
    path = native_dir / "warmup.dat"
    try:
        run_fio("warmup", path, "write", "1M", cfg.size, cfg.workdir / "logs", end_fsync=True)
    finally:
        path.unlink(missing_ok=True)
    return time.monotonic() - start


# --------------------------------------------------------------------------- reporting


def capture(argv: list[str]) -> str | None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if proc.returncode == 0 and text else None


def machine_facts(workdir: Path) -> dict[str, Any]:
    """What a reader needs to judge whether two result files are comparable."""
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    mem = re.search(r"MemTotal:\s+(\d+) kB", meminfo)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.+)", cpuinfo)
    fstype = None
    with open("/proc/mounts", encoding="utf-8") as fh:
        best = ""
        for line in fh:
            fields = line.split()
            mp = fields[1]
            if (str(workdir) + "/").startswith(mp.rstrip("/") + "/") and len(mp) >= len(best):
                best, fstype = mp, fields[2]
    try:
        pyfuse3 = importlib.metadata.version("pyfuse3")
    except importlib.metadata.PackageNotFoundError:
        pyfuse3 = None
    return {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model[1].strip() if model else None,
        "mem_total_mib": int(mem[1]) // 1024 if mem else None,
        "libfuse": capture(["pkg-config", "--modversion", "fuse3"]),
        "fusermount3": capture(["fusermount3", "--version"]),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "pyfuse3": pyfuse3,
        "fio": capture(["fio", "--version"]),
        "bindfs": capture(["bindfs", "--version"]),
        "rclone": capture(["rclone", "version"]),
        "juicefs": capture([str(JuicefsTarget.VENV / "bin" / "juicefs"), "version"]),
        "git": capture(["git", "--version"]),
        "tar": capture(["tar", "--version"]),
        "sqlite": sqlite3.sqlite_version,
        "git_commit": capture(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"]),
        "workdir": str(workdir),
        "workdir_fstype": fstype,
        "workdir_same_device_as_repo": workdir.stat().st_dev == REPO_ROOT.stat().st_dev,
    }


def summarize(
    runs: list[dict[str, Any]], workloads: list[str], targets: list[str]
) -> list[dict[str, Any]]:
    rows = []
    for wl in workloads:
        medians = {}
        for t in targets:
            values = [r["value"] for r in runs if r["workload"] == wl and r["target"] == t]
            if values:
                medians[t] = statistics.median(values)
                rows.append(
                    {
                        "workload": wl,
                        "target": t,
                        "n": len(values),
                        "median": medians[t],
                        "min": min(values),
                        "max": max(values),
                        "unit": UNITS[wl],
                    }
                )
        for row in rows:
            if row["workload"] == wl:
                base = medians.get("native")
                row["ratio"] = row["median"] / base if base else None
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    def num(value: float, unit: str) -> str:
        return f"{value:.1f}" if unit == "MB/s" or value < 100 else f"{value:.0f}"

    header = ("workload", "target", "median", "min", "max", "unit", "ratio-to-native")
    body = [
        (
            r["workload"],
            r["target"],
            num(r["median"], r["unit"]),
            num(r["min"], r["unit"]),
            num(r["max"], r["unit"]),
            r["unit"],
            "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}",
        )
        for r in rows
    ]
    return scale.text_table(header, body, left=2)


# --------------------------------------------------------------------------- driver


def parse_size(text: str) -> int:
    """fio-style sizes (K/M/G/T are powers of 1024), rounded down to whole MiB."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}, try 256M or 1G")
    power = " kmgt".index(m[2].lower() or " ")
    size = int(float(m[1]) * 1024**power) // MIB * MIB
    if size < MIB:
        raise argparse.ArgumentTypeError("size must be at least 1 MiB")
    return size


def csv_list(allowed: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        if text.strip() == "none":
            return []
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)} (or none)")
        return list(dict.fromkeys(items))

    return parse


def count_list(text: str) -> list[int]:
    if text.strip() in ("", "none"):
        return []
    try:
        return sorted({scale.parse_count(item) for item in text.split(",") if item.strip()})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}; try 10k,100k,1M or none") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--targets", type=csv_list(ALL_TARGETS), default=list(ALL_TARGETS))
    p.add_argument(
        "--workloads",
        type=csv_list(WORKLOADS),
        default=list(WORKLOADS),
        help="comma-separated, or none to run only the scale part",
    )
    p.add_argument("--size", type=parse_size, help="test file size (default 1G)")
    p.add_argument("--repeats", type=int, help="repeats of everything (default 3)")
    p.add_argument("--runtime", type=float, help="seconds per random-I/O run (default 10)")
    p.add_argument("--files", type=int, help="files in the smallfiles workload (default 10000)")
    p.add_argument("--entries", type=int, help="entries of the listed directory (default 100000)")
    p.add_argument("--txns", type=int, help="SQLite transactions per run (default 200)")
    p.add_argument("--rows", type=int, help="rows per SQLite transaction (default 50)")
    p.add_argument(
        "--one-row-txns", type=int, help="one-row SQLite transactions of real work (default 1000)"
    )
    p.add_argument(
        "--tree",
        type=lambda text: [s.strip() for s in text.split(",") if s.strip()],
        help="directories (comma-separated) whose tarball the real-work group untars "
        f"(default {','.join(realwork.DEFAULT_SOURCES)}; __pycache__ left out)",
    )
    p.add_argument(
        "--scale",
        type=count_list,
        help="volfs volume sizes in files for the scale table (default 10k,100k,1M; none skips)",
    )
    p.add_argument("--scale-ops", type=int, help="files stat()ed and cycled per size (10000)")
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes that create the untimed fixtures (default: one per core)",
    )
    p.add_argument("--workdir", type=Path, help="scratch dir (default: new dir in /var/tmp)")
    p.add_argument("--json", type=Path, default=BENCH_DIR / "results" / "latest.json")
    p.add_argument("--keep", action="store_true", help="keep the scratch data and logs")
    p.add_argument("--smoke", action="store_true", help="tiny sizes to check the harness works")
    args = p.parse_args(argv)
    preset = SMOKE if args.smoke else DEFAULTS
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    counts = (args.repeats, args.files, args.entries, args.txns, args.rows, args.scale_ops,
              args.one_row_txns)  # fmt: skip
    if min(counts) < 1 or args.runtime <= 0 or args.workers < 1:
        p.error("--repeats, --runtime, --files, --entries, --txns, --rows, --scale-ops, "
                "--one-row-txns and --workers must be positive")  # fmt: skip
    names = [Path(t).name for t in args.tree]
    if set(realwork.WORKLOADS) & set(args.workloads) and (
        not args.tree or len(set(names)) != len(names) or not all(map(os.path.isdir, args.tree))
    ):
        p.error(f"--tree {','.join(args.tree)}: give existing directories with different names")
    if "native" not in args.targets:
        # Ratios are the point; a run without its own baseline cannot produce them.
        args.targets.insert(0, "native")
    return args


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Let cleanup finish even if the user presses Ctrl-C again."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def record_sample(report: dict[str, Any], rep: int, target: str, workload: str, sample: dict):
    unit = UNITS[workload]
    log(f"[{rep + 1}/{report['config']['repeats']}] {target:<7} {workload:<20} "
        f"{sample['value']:12.1f} {unit}")  # fmt: skip
    report["runs"].append(
        {"repeat": rep, "target": target, "workload": workload, "unit": unit, **sample}
    )


def run_comparison(args: argparse.Namespace, report: dict[str, Any], made: list[Target]) -> int:
    """Every selected workload on every target, repeats times; returns the exit status."""
    rc = 0
    live: list[Target] = []
    for name in args.targets:
        target = TARGET_CLASSES[name](args.workdir)
        made.append(target)  # everything setup() was tried on, so teardown misses nothing
        try:
            target.setup()
        except TargetMissing as exc:
            log(f"{name}: missing: {exc}")
            report["targets"][name] = {"status": "missing", "reason": str(exc)}
            continue
        live.append(target)
        report["targets"][name] = {"status": "ok", "path": str(target.path)}
        if isinstance(target, JuicefsTarget):  # its venv may be new since machine_facts
            report["machine"]["juicefs"] = capture([str(target.binary()), "version"])
    native = made[0]

    unprepared: dict[str, str] = {}
    if {"listdir_cold", "listdir_warm"} & set(args.workloads):
        for target in live:
            log(f"{target.name}: creating {args.entries} entries to list")
            try:
                report["targets"][target.name]["listdir_setup"] = prepare_listdir(target, args)
            except Exception as exc:
                unprepared[target.name] = f"creating the directory failed: {exc}"

    if set(realwork.WORKLOADS) & set(args.workloads):
        log(f"making the source tree from {', '.join(args.tree)}")
        args.source_tree = realwork.make_tree(args.workdir, args.tree)
        report["realwork_tree"] = realwork.describe(args.source_tree)

    log(f"warming up the disk with {args.size // MIB} MiB in {native.path}")
    report["warmup_s"] = warm_up_disk(native.path, args)

    wanted_all = set(args.workloads)
    for rep in range(args.repeats):
        # Rotate the order so slow drift over the run does not favour one target.
        order = live[rep % len(live) :] + live[: rep % len(live)]
        for target in order:
            info = report["targets"][target.name]
            for names, group in GROUPS:
                wanted = wanted_all & set(names)
                if not wanted or info.get("dead"):
                    continue
                done = "nothing"
                try:
                    if group is listdir_group and target.name in unprepared:
                        raise RuntimeError(unprepared[target.name])
                    for workload, sample in group(target, args, wanted):
                        record_sample(report, rep, target.name, workload, sample)
                        done = workload
                except Unsupported as exc:
                    log(f"{target.name}: {'/'.join(exc.workloads)} not run: {exc}")
                    info.setdefault("unsupported", {}).update(
                        dict.fromkeys(exc.workloads, str(exc))
                    )
                except Exception as exc:  # a broken workload must not stop the others
                    reason = f"{type(exc).__name__}: {exc}"
                    log(f"{target.name}: {'/'.join(names)} failed after {done}: {reason}")
                    info["status"] = "failed"
                    info.setdefault("reason", reason)
                    info.setdefault("errors", []).append(
                        {
                            "repeat": rep,
                            "workloads": list(names),
                            "after": done,
                            "reason": reason,
                            "daemon_log": target.diagnostics(),
                        }
                    )
                    rc = 1
                    gone = isinstance(target, MountTarget) and not is_mounted(target.mountpoint)
                    if gone:
                        info["dead"] = True
                        with shielded():
                            target.teardown()
    for target in live:
        if isinstance(target, RcloneTarget):
            report["targets"][target.name]["log_errors"] = target.error_count()
    return rc


def run_scale_part(args: argparse.Namespace, report: dict[str, Any], made: list[Target]) -> int:
    """The scale table's measurements on a volume of its own; returns the exit status."""
    results: list[dict[str, Any]] = []
    info: dict[str, Any] = {"sizes": args.scale, "ops": args.scale_ops, "results": results}
    report["scale"] = info
    target = VolfsTarget(args.workdir, volume="scale", store="store-scale")
    made.append(target)
    try:
        scale.run_scale(target, args.scale, args, log, results)
    except TargetMissing as exc:
        log(f"scale: volfs missing: {exc}")
        info.update(status="missing", reason=str(exc))
        return 0
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        log(f"scale: failed: {reason}")
        info.update(status="failed", reason=reason, daemon_log=target.diagnostics())
        return 1
    finally:
        with shielded():
            target.teardown()
    info["status"] = "ok"
    return 0


SCRATCH = ("native", "store", "store-scale", "run-store", "run-store-scale", "bindfs-src",
           "rclone-src", "rclone-cache", "rclone.conf", "juicefs-data", "mnt-volfs",
           "mnt-bindfs", "mnt-rclone", "mnt-juicefs", "mnt-scale", realwork.TARBALL,
           "git-home", "logs")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Explicitly, because a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)

    own_workdir = args.workdir is None
    if own_workdir:
        args.workdir = Path(tempfile.mkdtemp(prefix="volfs-bench-", dir="/var/tmp"))
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)

    report: dict[str, Any] = {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "config": {
            "targets": args.targets,
            "workloads": args.workloads,
            "size_bytes": args.size,
            "repeats": args.repeats,
            "runtime_s": args.runtime,
            "files": args.files,
            "entries": args.entries,
            "sqlite_transactions": args.txns,
            "sqlite_rows_per_transaction": args.rows,
            "sqlite_one_row_transactions": args.one_row_txns,
            "tree_sources": args.tree,
            "scale_sizes": args.scale,
            "scale_ops": args.scale_ops,
            "workers": args.workers,
            "rclone_options": list(RcloneTarget.OPTIONS),
            "smoke": args.smoke,
        },
        "machine": machine_facts(args.workdir),
        "targets": {},
        "runs": [],
    }
    if not report["machine"]["workdir_same_device_as_repo"]:
        log(f"warning: {args.workdir} is not on the same device as {REPO_ROOT}")

    made: list[Target] = []
    rc = 0
    try:
        if args.workloads:
            rc = run_comparison(args, report, made)
            with shielded():  # the scale part runs alone, with the comparison's daemons gone
                for target in reversed(made):
                    target.teardown()
        if args.scale:
            rc = max(rc, run_scale_part(args, report, made))
    except KeyboardInterrupt:
        log("interrupted, cleaning up")
        report["interrupted"] = True
        rc = 130
    except Exception as exc:  # still clean up, report and print what was measured
        log(f"error: {type(exc).__name__}: {exc}")
        report["error"] = f"{type(exc).__name__}: {exc}"
        rc = 1
    finally:
        with shielded():
            for target in reversed(made):
                try:
                    target.teardown()
                except Exception as exc:  # keep unmounting the rest
                    log(f"{target.name}: teardown error: {exc}")
            leftovers = mounts_under(args.workdir)
            for path in leftovers:
                force_unmount(path, args.workdir / "logs" / "cleanup.log")
            leftovers = mounts_under(args.workdir)
            if leftovers:
                log(f"ERROR: still mounted: {', '.join(map(str, leftovers))}")
                report["leftover_mounts"] = [str(p) for p in leftovers]
                rc = 2
            elif not args.keep:
                if own_workdir:
                    shutil.rmtree(args.workdir, ignore_errors=True)
                else:
                    for sub in SCRATCH:
                        path = args.workdir / sub
                        if path.is_dir():
                            shutil.rmtree(path, ignore_errors=True)
                        else:
                            path.unlink(missing_ok=True)

            report["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            report["summary"] = summarize(report["runs"], args.workloads, args.targets)
            report["requests"] = requestcount.summarize(report["runs"])
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")

    if args.workloads:
        print(format_table(report["summary"]) if report["summary"] else "no results")
        if report["requests"]:
            print()
            print(requestcount.format_summary(report["requests"]))
        for name in args.targets:
            info = report["targets"].get(name, {"status": "not run", "reason": "interrupted"})
            if info["status"] != "ok":
                reason = info["reason"].replace("\n", "\n    ")
                more = len(info.get("errors", [])) - 1
                more_text = f" (and {more} more errors, see the JSON)" if more > 0 else ""
                print(f"{name}: {info['status']}: {reason}{more_text}")
            for reason in dict.fromkeys(info.get("unsupported", {}).values()):
                print(f"{name}: not run: {reason}")
    if args.scale and "scale" in report:
        info = report["scale"]
        print()
        print(scale.format_scale(info["results"]))
        if info.get("status", "not finished") != "ok":
            print(f"scale: {info.get('status', 'not finished')}: {info.get('reason', '')}")
    print(f"raw results: {args.json}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
