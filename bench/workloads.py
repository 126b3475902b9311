"""The workloads of bench/run.py that are plain Python rather than fio.

Each one times only the calls it is named after and returns a sample dict whose
"value" is the figure the tables show; the other keys go to the JSON file.
os-level calls keep the interpreter's share of each operation small and equal
on every target.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

PAYLOAD_SIZE = 4096


def drop_caches() -> bool:
    """Write back, then evict the page cache, dentries and inodes (needs root)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def _per_phase(name: str, count: int, seconds: float) -> dict[str, float]:
    return {f"{name}_per_s": count / seconds, f"{name}_us": seconds / count * 1e6}


def smallfiles(directory: Path, count: int) -> dict[str, Any]:
    """count x (create + write 4 KiB + close), then stat, read and unlink each, in one dir."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir()
    payload = os.urandom(PAYLOAD_SIZE)
    names = [str(directory / f"f{i:06d}") for i in range(count)]
    t0 = time.perf_counter()
    for name in names:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if os.write(fd, payload) != PAYLOAD_SIZE:
                raise RuntimeError(f"short write to {name}")
        finally:
            os.close(fd)
    t1 = time.perf_counter()
    for name in names:
        if os.stat(name).st_size != PAYLOAD_SIZE:
            raise RuntimeError(f"{name} has the wrong size after write")
    t2 = time.perf_counter()
    for name in names:
        fd = os.open(name, os.O_RDONLY)
        try:
            if os.read(fd, PAYLOAD_SIZE + 1) != payload:
                raise RuntimeError(f"{name} reads back other bytes than were written")
        finally:
            os.close(fd)
    t3 = time.perf_counter()
    for name in names:
        os.unlink(name)
    t4 = time.perf_counter()
    directory.rmdir()
    return {
        "value": count / (t4 - t0),
        "files": count,
        "seconds": t4 - t0,
        "cycle_us": (t4 - t0) / count * 1e6,
        **_per_phase("create", count, t1 - t0),
        **_per_phase("stat", count, t2 - t1),
        **_per_phase("read", count, t3 - t2),
        **_per_phase("unlink", count, t4 - t3),
    }


def listdir(directory: Path, expect: int) -> dict[str, Any]:
    """List a directory with os.scandir and lstat every entry; entries/s over both."""
    t0 = time.perf_counter()
    with os.scandir(directory) as it:
        paths = [entry.path for entry in it]
    t1 = time.perf_counter()
    for path in paths:
        os.lstat(path)
    t2 = time.perf_counter()
    if len(paths) != expect:
        raise RuntimeError(f"{directory} lists {len(paths)} entries, expected {expect}")
    return {
        "value": len(paths) / (t2 - t0),
        "entries": len(paths),
        "seconds": t2 - t0,
        "scandir_s": t1 - t0,
        "lstat_s": t2 - t1,
        "scandir_per_s": len(paths) / (t1 - t0),
        "lstat_per_s": len(paths) / (t2 - t1),
    }


def sqlite_inserts(path: Path, journal_mode: str, txns: int, rows: int) -> dict[str, Any]:
    """txns transactions of `rows` INSERTs each into a new database, synchronous=FULL."""
    suffixes = ("", "-journal", "-wal", "-shm")
    for suffix in suffixes:
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    con = sqlite3.connect(path, isolation_level=None)  # we issue BEGIN/COMMIT ourselves
    try:
        mode = con.execute(f"PRAGMA journal_mode={journal_mode}").fetchone()[0]
        if mode.lower() != journal_mode.lower():
            raise RuntimeError(f"SQLite refused journal_mode={journal_mode} (got {mode})")
        con.execute("PRAGMA synchronous=FULL")
        con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k INTEGER NOT NULL, v TEXT)")
        batch = [(i, os.urandom(50).hex()) for i in range(rows)]
        t0 = time.perf_counter()
        for _ in range(txns):
            con.execute("BEGIN")
            con.executemany("INSERT INTO t (k, v) VALUES (?, ?)", batch)
            con.execute("COMMIT")
        seconds = time.perf_counter() - t0
        stored = con.execute("SELECT count(*) FROM t").fetchone()[0]
        if stored != txns * rows:
            raise RuntimeError(f"{path} holds {stored} rows after inserting {txns * rows}")
    finally:
        con.close()
    for suffix in suffixes:
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return {
        "value": txns / seconds,
        "transactions": txns,
        "rows_per_transaction": rows,
        "seconds": seconds,
        "journal_mode": mode,
        "synchronous": "FULL",
        "sqlite": sqlite3.sqlite_version,
    }


# --------------------------------------------------------------------------- populating


def _create_empty(job: tuple[str, list[str], bool]) -> int:
    """Create empty files in one directory (a worker process's unit of work)."""
    directory, names, make_dir = job
    if make_dir:
        os.makedirs(directory, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for name in names:
        os.close(os.open(os.path.join(directory, name), flags, 0o644))
    return len(names)


def _run_jobs(jobs: list[tuple[str, list[str], bool]], workers: int) -> int:
    if workers <= 1 or len(jobs) <= 1:
        return sum(map(_create_empty, jobs))
    # Forked workers: a FUSE daemon answers on one core, the callers use the other.
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        return sum(pool.map(_create_empty, jobs))


def populate_flat(directory: Path, count: int, workers: int) -> float:
    """count empty files e0000000.. in one directory; returns the seconds it took."""
    directory.mkdir(parents=True, exist_ok=True)
    names = [f"e{i:07d}" for i in range(count)]
    step = 1000
    jobs = [(str(directory), names[i : i + step], False) for i in range(0, count, step)]
    t0 = time.perf_counter()
    made = _run_jobs(jobs, workers)
    if made != count:
        raise RuntimeError(f"created {made} of {count} entries in {directory}")
    return time.perf_counter() - t0


TREE_FANOUT = 1000


def tree_path(root: Path, index: int) -> Path:
    """The file number `index` of a populated tree: 1000 files per directory."""
    return root / f"d{index // TREE_FANOUT:05d}" / f"f{index % TREE_FANOUT:03d}"


def populate_tree(root: Path, start: int, stop: int, workers: int) -> float:
    """Empty files number start..stop-1 of the tree at root; returns the seconds it took."""
    jobs = []
    for first in range(start, stop, TREE_FANOUT):
        last = min(stop, (first // TREE_FANOUT + 1) * TREE_FANOUT)
        directory = tree_path(root, first).parent
        names = [tree_path(root, i).name for i in range(first, last)]
        jobs.append((str(directory), names, True))
    t0 = time.perf_counter()
    made = _run_jobs(jobs, workers)
    if made != stop - start:
        raise RuntimeError(f"created {made} of {stop - start} files under {root}")
    return time.perf_counter() - t0


def stat_paths(paths: list[Path]) -> dict[str, Any]:
    """stat each path once; the cost per call in microseconds."""
    names = [str(p) for p in paths]
    t0 = time.perf_counter()
    for name in names:
        os.stat(name)
    seconds = time.perf_counter() - t0
    return {"ops": len(names), "seconds": seconds, "us_per_op": seconds / len(names) * 1e6}
