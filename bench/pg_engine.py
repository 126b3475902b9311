"""A few figures of the PostgreSQL engine against the local store, through real mounts.

Starts a private PostgreSQL (tests/pg.py's `PostgresServer`), two workers serving one PG
volume (two "hosts") and one worker serving a local volume, then measures, for each mount:
4 KiB pwrite()s into one open file, stat() of files the kernel has not cached (each one a
LOOKUP and a GETATTR the mount answers), and the small-file cycle (create, write 4 KiB,
close, unlink); and, between the two PG mounts, how long a new file takes to appear on the
other host (from close() on one to the name on the other).  Run as root:

    .venv/bin/python bench/pg_engine.py [--count N]

Figures are wall-clock rates of one process at queue depth 1; other load on the machine shows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from volfs.pg.schema import create_volume
from volfs.store.root import StoreRoot

from pg import EngineWorker, PostgresServer, bin_dir


def _rate(count: int, seconds: float) -> str:
    return f"{count / seconds:8.0f}/s"


def small_writes(mnt: Path, count: int) -> float:
    fd = os.open(mnt / "w.dat", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        started = time.perf_counter()
        for i in range(count):
            os.pwrite(fd, b"x" * 4096, (i * 7919 % 256) * 4096)
        return time.perf_counter() - started
    finally:
        os.close(fd)


def cold_stats(mnt: Path, count: int) -> float:
    d = mnt / "stats"
    d.mkdir()
    for i in range(count):
        (d / f"f{i}").touch()
    subprocess.run(["sh", "-c", "echo 2 > /proc/sys/vm/drop_caches"], check=False)
    started = time.perf_counter()
    for i in range(count):
        os.stat(d / f"f{i}")
    return time.perf_counter() - started


def small_files(mnt: Path, count: int) -> float:
    started = time.perf_counter()
    for i in range(count):
        path = mnt / f"s{i}"
        with open(path, "wb") as f:
            f.write(b"y" * 4096)
        os.unlink(path)
    return time.perf_counter() - started


def visibility(a: Path, b: Path, count: int) -> list[float]:
    """Seconds from close() on *a* to the name on *b* (b's kernel had the name as missing)."""
    delays = []
    for i in range(count):
        name = f"seen{i}"
        assert not (b / name).exists()
        (a / name).write_bytes(b"z")
        done = time.perf_counter()
        while not (b / name).exists():
            pass
        delays.append(time.perf_counter() - done)
    return delays


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=2000)
    args = parser.parse_args()
    found = bin_dir()
    assert found is not None, "PostgreSQL's binaries are not installed"
    base = Path(tempfile.mkdtemp(prefix="volfs-pgbench-"))
    base.chmod(0o755)  # the server runs as postgres, under it
    server = PostgresServer(found, base / "pg")
    workers: list[EngineWorker] = []
    local = None
    try:
        server.start()
        url = server.url()
        create_volume(url, "bench")
        workers = [EngineWorker(url, "bench", base / f"host{i}") for i in range(2)]
        local_base = base / "local"
        local_base.mkdir()
        StoreRoot(local_base / "store").create_volume("bench")
        (local_base / "mnt").mkdir()
        local = subprocess.Popen([sys.executable, "-m", "volfs.worker", "--root",
                                  str(local_base / "store"), "--name", "bench", "--mountpoint",
                                  str(local_base / "mnt")])  # fmt: skip
        while not os.path.ismount(local_base / "mnt"):
            time.sleep(0.05)
        n = args.count
        for label, mnt in (("local", local_base / "mnt"), ("pg", workers[0].mountpoint)):
            print(f"{label:6} 4 KiB pwrite {_rate(n, small_writes(mnt, n))}  "
                  f"cold stat {_rate(n // 2, cold_stats(mnt, n // 2))}  "
                  f"small-file cycle {_rate(n // 4, small_files(mnt, n // 4))}")  # fmt: skip
        delays = sorted(visibility(workers[0].mountpoint, workers[1].mountpoint, 200))
        print(f"pg     new name on the other host after close(): median "
              f"{statistics.median(delays) * 1e3:.2f} ms, p90 {delays[180] * 1e3:.2f} ms, "
              f"max {delays[-1] * 1e3:.2f} ms")  # fmt: skip
    finally:
        for worker in workers:
            worker.stop()
        if local is not None:
            local.terminate()
            local.wait()
        server.stop()


if __name__ == "__main__":
    main()
