#!/usr/bin/env python3
"""Snapshots, clones and rollback: their time, and the disk and memory a snapshot costs.

    sudo .venv/bin/python bench/snapshots.py [--big] [--count 1000] [--json FILE]
    .venv/bin/python bench/snapshots.py --smoke --json /tmp/snapshots.json   # tiny, ~10 s

Part 1, for volumes of three shapes: 10 MiB in one file, 1 GiB in files of 256 MiB (10 GiB in
files of 1 GiB with ``--big``; the disk needs twice that free), and 100,000 files of 4 KiB
in directories of 1,000. Each is filled through the store's `Volume` (not timed), closed (a
checkpoint), then timed, median of ``--repeats``:

* ``snapshot, unmounted``: `history.take_unserved`, what ``volfsd snapshot`` of an unmounted
  volume does: lock and load the volume, take the snapshot, close;
* ``snapshot, loaded``: `snapshots.take` on the volume loaded once, what a worker does
  between two requests (sync, links, checkpoint, header, rename, each fsynced);
* ``load``: opening the volume (lock, checkpoint, replay): the rest of the unmounted case;
* ``snapshot, mounted``: ``volfsd snapshot NAME@SNAP`` typed against the daemon while the
  volume is mounted (a CLI process each: Python's start is most of it), and ``the request
  alone``, the same request sent from here (daemon, worker, the snapshot between two requests);
* ``clone``: `history.clone` of the first snapshot into a new volume;
* ``rollback``: `history.rollback` to the first snapshot, after a 4 KiB write and a clean
  close of the volume;
* ``rm snapshot``: `history.remove`.

Part 2, ``--count`` snapshots of one 10 MiB volume, each after a 4 KiB overwrite, on the
volume loaded once (the worker's case): time per snapshot (median, 90th percentile, first and
last hundred) and disk per snapshot; then the volume served by a daemon's worker (``volfsd
mount``), ``--count`` more snapshots through the daemon, each after a 4 KiB write through the
mount: their time, and the worker's and the daemon's resident memory before and after; and
the mount time with no snapshot and with ``--count``. Disk is counted by ``du -s -B1``, which counts
each inode once however many names it has: a segment the volume and its snapshots share counts
once, so the growth of the volume directory is what the snapshots (and the writes between
them) added. The JSON has every sample.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from run import machine_facts
from scale import vm_status
from targets import TargetMissing, VolfsTarget

from volfs import control, requests
from volfs.store import history, snapshots
from volfs.store.root import StoreRoot
from volfs.store.state import ROOT_INO, Inode
from volfs.store.volume import Volume

BENCH_DIR = Path(__file__).resolve().parent
MIB, GIB = 1 << 20, 1 << 30
NAME = "snap"
#: Bytes written per call when filling: FUSE's largest write, what a mount would append.
PIECE = MIB
#: The change made between two snapshots, and before a rollback.
CHANGE = 4096
VOLFSD = [sys.executable, "-m", "volfs"]
FILES_PER_DIR = 1000


class Case:
    """One shape of volume: *files* files of *size* bytes each."""

    def __init__(self, label: str, files: int, size: int) -> None:
        self.label, self.files, self.size = label, files, size

    def as_json(self) -> dict[str, Any]:
        return {"label": self.label, "files": self.files, "file_size": self.size}


def cases_for(args: argparse.Namespace) -> list[Case]:
    if args.smoke:
        return [Case("1 MiB", 1, MIB), Case("4 MiB", 2, 2 * MIB), Case("1000 files", 1000, 4096)]
    big = Case("10 GiB", 10, GIB) if args.big else Case("1 GiB", 4, 256 * MIB)
    return [Case("10 MiB", 1, 10 * MIB), big, Case("100k files", 100_000, 4096)]


# -- filling and measuring ---------------------------------------------------------------------


def new_file(volume: Volume, parent: Inode, name: bytes, mode: int) -> Inode:
    now = time.time_ns()
    inode = volume.new_inode(mode, 0, 0, 0, now)
    volume.create(parent, name, inode, now)
    return volume.inodes[inode.ino]  # the state's own, made from the record


def fill(store: StoreRoot, case: Case) -> float:
    """Volume NAME holding *case*'s files, written through the store; seconds it took."""
    start = time.perf_counter()
    volume = store.open_volume(NAME)
    try:
        data = os.urandom(min(PIECE, case.size))
        root, parent = volume.inodes[ROOT_INO], None
        for i in range(case.files):
            if i % FILES_PER_DIR == 0:
                parent = new_file(
                    volume, root, b"d%04d" % (i // FILES_PER_DIR), stat.S_IFDIR | 0o755
                )
            assert parent is not None
            inode = new_file(volume, parent, b"f%06d" % i, stat.S_IFREG | 0o644)
            for offset in range(0, case.size, len(data)):
                volume.write(inode, offset, data[: case.size - offset], time.time_ns())
        volume.sync()
    finally:
        volume.close()
    return time.perf_counter() - start


def change(volume: Volume, i: int) -> None:
    """Overwrite 4 KiB of the volume's first file (a different place each time)."""
    inode = first_file(volume)
    offset = (i * CHANGE) % max(CHANGE, inode.size - CHANGE)
    volume.write(inode, offset, os.urandom(CHANGE), time.time_ns())


def first_file(volume: Volume) -> Inode:
    inode = volume.inodes[ROOT_INO]
    while inode.entries is not None:
        inode = volume.inodes[min(inode.entries.items())[1]]
    return inode


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def stats(samples: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "samples": samples}  # fmt: skip


def du(path: Path) -> int:
    """Disk bytes under *path*, each inode counted once (``du -s -B1``)."""
    out = subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    return int(out.split()[0])


def rss_kib() -> int:
    gc.collect()
    return vm_status(os.getpid()).get("VmRSS", 0)


# -- part 1: each verb at each size ------------------------------------------------------------


def measure_case(work: Path, case: Case, repeats: int, log: Callable[[str], None]) -> dict:
    work.mkdir()
    store = StoreRoot(work / "store")
    log(f"{case.label}: filling")
    result: dict[str, Any] = {**case.as_json(), "fill_s": fill(store, case)}
    result["volume_du"] = du(store.volume_path(NAME))
    log(f"{case.label}: snapshots, clones, rollbacks")
    result["snapshot_unmounted_s"] = stats(
        [timed(lambda i=i: history.take_unserved(store, NAME, f"u{i}")) for i in range(repeats)]
    )
    load: list[float] = []
    start = time.perf_counter()
    volume = store.open_volume(NAME, create=False)
    load.append(time.perf_counter() - start)
    try:
        result["snapshot_loaded_s"] = stats(
            [timed(lambda i=i: snapshots.take(volume, f"w{i}")) for i in range(repeats)]
        )
    finally:
        volume.close()
    result["load_s"] = stats(load)
    snap_dir = history.snapshot_path(store, NAME, "u0")
    result["snapshot_checkpoint_bytes"] = (snap_dir / "checkpoint").stat().st_size
    result["snapshot_segments"] = sum(1 for _ in snap_dir.glob("seg-*.log"))
    result["clone_s"] = stats(
        [timed(lambda i=i: history.clone(store, NAME, "u0", f"c{i}")) for i in range(repeats)]
    )
    rollbacks = []
    for i in range(repeats):
        volume = store.open_volume(NAME, create=False)
        change(volume, i)
        volume.close()
        rollbacks.append(timed(lambda: history.rollback(store, NAME, "u0")))
    result["rollback_s"] = stats(rollbacks)
    result["rm_snapshot_s"] = stats(
        [timed(lambda i=i: history.remove(store, NAME, f"w{i}")) for i in range(repeats)]
    )
    mounted = mounted_snapshots(work, repeats, log)
    result["snapshot_mounted_cli"] = mounted["cli"]
    result["snapshot_mounted_request"] = mounted["request"]
    result["mounted_memory"] = mounted["memory"]
    return result


def mounted_snapshots(work: Path, repeats: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Snapshots of the volume mounted by the daemon: ``volfsd snapshot NAME@SNAP`` as a user
    types it (a CLI process each), and the same request sent from here (no process start)."""
    target = VolfsTarget(work, volume=NAME, store="store")
    log("  snapshots of the volume mounted by the daemon")
    try:
        target.setup()
        cli = [timed(lambda i=i: subprocess.run([*VOLFSD, "snapshot", f"{NAME}@cli{i}"],
                                                env=target.env(), check=True,
                                                capture_output=True))
               for i in range(repeats)]  # fmt: skip
        request = [timed(lambda i=i: control.call(
                       target.run_dir, requests.SnapshotRequest(f"{NAME}@req{i}")))
                   for i in range(repeats)]  # fmt: skip
        return {"cli": stats(cli), "request": stats(request), "memory": memory(target)}
    finally:
        if not target.teardown():
            raise RuntimeError(f"could not unmount {target.mountpoint}")


# -- part 2: many snapshots of one volume ------------------------------------------------------


def daemon_pid(target: VolfsTarget) -> int:
    return int((target.run_dir / "volfsd.pid").read_text().split()[0])


def memory(target: VolfsTarget) -> dict[str, dict[str, int]]:
    """VmHWM and VmRSS (KiB) of the worker serving *target* and of its daemon."""
    return {"worker": vm_status(target.worker_pid()), "daemon": vm_status(daemon_pid(target))}


def served(work: Path, count: int, start: int) -> dict[str, Any]:
    """The volume mounted by a daemon's worker: its mount time (the daemon's start included)
    and memory; then *count* snapshots through the daemon, each after a 4 KiB write through
    the mount (the request ``volfsd snapshot`` sends, without starting a CLI each time)."""
    target = VolfsTarget(work, volume=NAME, store="store")
    try:
        result: dict[str, Any] = {"mount_s": timed(target.setup), "before": memory(target)}
        path = target.mountpoint / "d0000" / "f000000"
        size = path.stat().st_size
        takes = []
        fd = os.open(path, os.O_WRONLY)
        try:
            for i in range(start, start + count):
                os.pwrite(fd, os.urandom(CHANGE), (i * CHANGE) % (size - CHANGE))
                request = requests.SnapshotRequest(f"{NAME}@m{i:05d}")
                takes.append(timed(lambda r=request: control.call(target.run_dir, r)))
        finally:
            os.close(fd)
        result["after"] = memory(target)
        result["take_s"] = series(takes) if takes else None
        return result
    finally:
        if not target.teardown():
            raise RuntimeError(f"could not unmount {target.mountpoint}")


def series(takes: list[float]) -> dict[str, Any]:
    return {**stats(takes), "p90": statistics.quantiles(takes, n=10)[-1],
            "first_100_median": statistics.median(takes[:100]),
            "last_100_median": statistics.median(takes[-100:])}  # fmt: skip


def many_snapshots(work: Path, count: int, log: Callable[[str], None]) -> dict[str, Any]:
    """*count* snapshots of one volume on the store API, then *count* more through a mount."""
    work.mkdir()
    store = StoreRoot(work / "store")
    fill(store, Case("10 MiB", 1, 10 * MIB))
    volume_dir = store.volume_path(NAME)
    log(f"{count} snapshots: serving the volume with none")
    result: dict[str, Any] = {"count": count, "served_without": served(work, 0, 0)}
    du_before = du(volume_dir)
    volume = store.open_volume(NAME, create=False)
    try:
        log_before, rss_before = volume.log.total, rss_kib()
        takes = []
        for i in range(count):
            change(volume, i)
            takes.append(timed(lambda i=i: snapshots.take(volume, f"s{i:05d}")))
        result["rss_kib"] = {"before": rss_before, "after": rss_kib()}
        result["log_written_bytes"] = volume.log.total - log_before
    finally:
        volume.close()
    result["take_s"] = series(takes)
    snaps_dir = volume_dir / snapshots.SNAPSHOTS_DIR
    own = [p.stat().st_blocks * 512 for p in snaps_dir.glob("*/*") if not p.name.startswith("seg-")]
    result["du"] = {"volume_before": du_before, "volume_after": du(volume_dir),
                    "snapshots_dir": du(snaps_dir), "own_files": sum(own)}  # fmt: skip
    result["describe_s"] = timed(lambda: history.describe(store, NAME))
    log(f"{count} snapshots: serving the volume with them, {count} more through the daemon")
    result["served_with"] = served(work, count, count)
    result["remove_all_s"] = timed(lambda: history.remove_all(store, NAME))
    return result


# -- report ------------------------------------------------------------------------------------


def ms(figure: dict[str, Any] | None) -> str:
    return "-" if figure is None else f"{figure['median'] * 1000:.1f}"


def print_tables(report: dict[str, Any]) -> None:
    rows = [("snapshot, unmounted ms", "snapshot_unmounted_s"),
            ("snapshot, loaded ms", "snapshot_loaded_s"), ("load ms", "load_s"),
            ("snapshot, mounted (CLI) ms", "snapshot_mounted_cli"),
            ("  the request alone ms", "snapshot_mounted_request"), ("clone ms", "clone_s"),
            ("rollback ms", "rollback_s"), ("rm snapshot ms", "rm_snapshot_s")]  # fmt: skip
    cases = report["cases"]
    print(f"{'median of ' + str(report['config']['repeats']):27s}"
          + "".join(f" | {c['label']:>11s}" for c in cases))  # fmt: skip
    print("-" * 27 + "".join("-+-" + "-" * 11 for _ in cases))
    for title, key in rows:
        print(f"{title:27s}" + "".join(f" | {ms(c[key]):>11s}" for c in cases))
    print(
        f"{'checkpoint KiB':27s}"
        + "".join(f" | {c['snapshot_checkpoint_bytes'] / 1024:11.1f}" for c in cases)
    )
    print(f"{'segments linked':27s}" + "".join(f" | {c['snapshot_segments']:11d}" for c in cases))
    many = report["many"]
    n, take, d = many["count"], many["take_s"], many["du"]
    print()
    print(f"{n} snapshots of a 10 MiB volume, a {CHANGE} B overwrite before each:")
    print(f"  time per snapshot      median {take['median'] * 1000:.1f} ms, p90 "
          f"{take['p90'] * 1000:.1f} ms, first 100 {take['first_100_median'] * 1000:.1f} ms, "
          f"last 100 {take['last_100_median'] * 1000:.1f} ms")  # fmt: skip
    grown = d["volume_after"] - d["volume_before"]
    print(f"  disk per snapshot      {grown / n / 1024:.1f} KiB (du of the volume dir, each "
          f"inode once; {many['log_written_bytes'] / n / 1024:.1f} KiB of it the writes), "
          f"own files {d['own_files'] / n / 1024:.1f} KiB")  # fmt: skip
    rss = many["rss_kib"]
    without, with_ = many["served_without"], many["served_with"]
    mounted = with_["take_s"]
    print(f"  through the daemon     median {mounted['median'] * 1000:.1f} ms, p90 "
          f"{mounted['p90'] * 1000:.1f} ms, first 100 {mounted['first_100_median'] * 1000:.1f}"
          f" ms, last 100 {mounted['last_100_median'] * 1000:.1f} ms ({n} more, mounted, "
          "a 4 KiB pwrite through the mount before each)")  # fmt: skip
    before, after = with_["before"], with_["after"]
    grown = after["worker"].get("VmRSS", 0) - before["worker"].get("VmRSS", 0)
    print(f"  memory per snapshot    {grown / n:.2f} KiB of the worker's RSS over those {n} "
          f"({before['worker'].get('VmRSS', 0) / 1024:.1f} -> "
          f"{after['worker'].get('VmRSS', 0) / 1024:.1f} MiB; "
          f"{without['before']['worker'].get('VmRSS', 0) / 1024:.1f} MiB with none); daemon "
          f"{before['daemon'].get('VmRSS', 0) / 1024:.1f} -> "
          f"{after['daemon'].get('VmRSS', 0) / 1024:.1f} MiB; the process taking the first {n}"
          f" {rss['before'] / 1024:.1f} -> {rss['after'] / 1024:.1f} MiB")  # fmt: skip
    print(f"  mount (daemon start included)  {without['mount_s'] * 1000:.0f} ms with none, "
          f"{with_['mount_s'] * 1000:.0f} ms with {n}")  # fmt: skip
    print(
        f"  list them {many['describe_s'] * 1000:.0f} ms; remove all {many['remove_all_s']:.2f} s"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--big", action="store_true", help="10 GiB instead of 1 GiB (~20 GB of disk)")
    p.add_argument("--count", type=int, help="snapshots of one volume (default 1000)")
    p.add_argument("--repeats", type=int, help="samples of each verb (default 3)")
    p.add_argument("--workdir", type=Path, help="scratch dir (default: new dir in /var/tmp)")
    p.add_argument("--json", type=Path, default=BENCH_DIR / "results" / "snapshots.json")
    p.add_argument("--smoke", action="store_true", help="tiny sizes to check the harness works")
    args = p.parse_args(argv)
    if args.count is not None and args.count < 2:
        p.error("--count: at least 2 (the table shows percentiles)")
    args.count = args.count or (30 if args.smoke else 1000)
    args.repeats = args.repeats or (2 if args.smoke else 3)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workdir is None:
        args.workdir = Path(tempfile.mkdtemp(prefix="volfs-bench-snap-", dir="/var/tmp"))
    args.workdir.mkdir(parents=True, exist_ok=True)

    def log(text: str) -> None:
        print(f"[{dt.datetime.now():%H:%M:%S}] {text}", file=sys.stderr, flush=True)

    report: dict[str, Any] = {
        "config": {
            "big": args.big,
            "count": args.count,
            "repeats": args.repeats,
            "smoke": args.smoke,
        },
        "machine": machine_facts(args.workdir),
        "cases": [],
    }
    try:
        for case in cases_for(args):
            work = args.workdir / case.label.replace(" ", "-")
            report["cases"].append(measure_case(work, case, args.repeats, log))
            shutil.rmtree(work)  # the disk for the next case
        report["many"] = many_snapshots(args.workdir / "many", args.count, log)
    except TargetMissing as exc:
        print(f"snapshots: the volume could not be mounted: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print_tables(report)
    print(f"raw results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
