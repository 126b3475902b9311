"""What locks cost on a PostgreSQL volume, and how soon a waiter on one host gets a lock
another host released, through real mounts.

Starts a private PostgreSQL (tests/pg.py's `PostgresServer`) and two workers serving one PG
volume (two "hosts"), then measures: an fcntl write lock taken and released (F_SETLK, then
F_UNLCK) on one host; a flock taken and released (LOCK_EX|LOCK_NB, then LOCK_UN); and, with
a flock held on host A and a blocking flock(LOCK_EX) waiting on host B, the time from A's
unlock returning to B's flock returning.  Run as root:

    .venv/bin/python bench/pg_locks.py [--count N]

Figures are wall-clock times of one process at queue depth 1; other load on the machine shows.
"""

from __future__ import annotations

import argparse
import fcntl
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import BinaryIO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from volfs.pg.schema import create_volume

from pg import EngineWorker, PostgresServer, bin_dir


def _summary(seconds: list[float]) -> str:
    ordered = sorted(seconds)
    return (f"median {statistics.median(ordered) * 1e3:.2f} ms, "
            f"p90 {ordered[len(ordered) * 9 // 10] * 1e3:.2f} ms, "
            f"max {ordered[-1] * 1e3:.2f} ms")  # fmt: skip


def round_trips(path: Path, count: int, flock: bool) -> list[float]:
    """Seconds per lock taken and released, *count* times."""
    times = []
    with open(path, "r+b") as f:
        for _ in range(count):
            started = time.perf_counter()
            if flock:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
            else:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.lockf(f, fcntl.LOCK_UN)
            times.append(time.perf_counter() - started)
    return times


def _wait(f: BinaryIO, granted: list[float]) -> None:
    fcntl.flock(f, fcntl.LOCK_EX)
    granted.append(time.perf_counter())


def wake_ups(a: Path, b: Path, count: int) -> list[float]:
    """Seconds from an unlock on *a* returning to a blocked flock on *b* returning."""
    delays = []
    with open(a, "rb") as held, open(b, "rb") as waiting:
        for _ in range(count):
            fcntl.flock(held, fcntl.LOCK_EX)
            granted: list[float] = []
            waiter = threading.Thread(target=_wait, args=(waiting, granted))
            waiter.start()
            time.sleep(0.05)  # let it wait (a bench, not a test: the figure is what counts)
            fcntl.flock(held, fcntl.LOCK_UN)
            unlocked = time.perf_counter()
            waiter.join()
            delays.append(granted[0] - unlocked)
            fcntl.flock(waiting, fcntl.LOCK_UN)
    return delays


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=1000)
    args = parser.parse_args()
    found = bin_dir()
    assert found is not None, "PostgreSQL's binaries are not installed"
    base = Path(tempfile.mkdtemp(prefix="volfs-pglocks-"))
    base.chmod(0o755)  # the server runs as postgres, under it
    server = PostgresServer(found, base / "pg")
    workers: list[EngineWorker] = []
    try:
        server.start()
        url = server.url()
        create_volume(url, "bench")
        workers = [EngineWorker(url, "bench", base / f"host{i}") for i in range(2)]
        a, b = (worker.mountpoint / "f" for worker in workers)
        a.write_bytes(b"")
        n = args.count
        print(f"fcntl F_SETLK + F_UNLCK on one host: {_summary(round_trips(a, n, False))}")
        print(f"flock LOCK_EX|LOCK_NB + LOCK_UN on one host: {_summary(round_trips(a, n, True))}")
        print(f"blocked flock on B after the unlock on A: {_summary(wake_ups(a, b, n // 10))}")
    finally:
        for worker in workers:
            worker.stop()
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
