"""A few figures of the PostgreSQL engine against the local store, through real mounts.

Starts a private PostgreSQL (tests/pg.py's `PostgresServer`), two workers serving one PG
volume (two "hosts") and one worker serving a local volume, then measures, for each mount:
4 KiB pwrite()s into one open file, stat() of files the kernel has not cached (each one a
LOOKUP and a GETATTR the mount answers), and the small-file cycle (create, write 4 KiB,
close, unlink); and, between the two PG mounts, how long a new file takes to appear on the
other host (from close() on one to the name on the other).  Then, in-process (`PgModel.run_sync`,
no kernel, no thread hop): a getattr step, a 4 KiB write step, 1 MiB sequential writes and
reads, with the data in blocks of --block-size bytes (the engine's is 64 KiB).  Run as root:

    .venv/bin/python bench/pg_engine.py [--count N] [--block-size BYTES]

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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from volfs import posix
from volfs.pg import blocks, schema
from volfs.pg.model import PgModel
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


def in_process(url: str, block_size: int, count: int) -> None:
    """Steps of the model itself, on a volume of its own, with *block_size* blocks."""
    schema.BLOCK_SIZE = blocks._B = block_size  # a bench's knob: the engine's is fixed
    create_volume(url, f"steps{block_size}")
    model = PgModel(url, f"steps{block_size}")
    model.open()
    try:
        started = time.perf_counter()
        for _ in range(count):
            model.run_sync(lambda view: posix.existing(view, posix.ROOT_INO))
        getattr_us = (time.perf_counter() - started) / count * 1e6

        def new_file(name: bytes) -> Any:
            def step(view: Any) -> Any:
                node = view.new_inode(0o100644, 0, 0, 0, 1)
                view.create(view.inode(posix.ROOT_INO), name, node, 1)
                return node

            return model.run_sync(step)

        small, big = new_file(b"small"), new_file(b"big")
        started = time.perf_counter()
        for i in range(count):
            offset = (i * 7919 % 256) * 4096
            model.run_sync(lambda view, o=offset: view.write(small, o, b"x" * 4096, 5))
        write_us = (time.perf_counter() - started) / count * 1e6
        chunk, mib = os.urandom(1 << 20), 64
        started = time.perf_counter()
        for i in range(mib):
            model.run_sync(lambda view, i=i: view.write(big, i << 20, chunk, 5))
        seq_write = mib / (time.perf_counter() - started)
        started = time.perf_counter()
        for i in range(mib):
            model.run_sync(lambda view, i=i: view.read(big, i << 20, 1 << 20))
        seq_read = mib / (time.perf_counter() - started)
        print(f"steps  {block_size >> 10} KiB blocks: getattr {getattr_us:.0f} us, 4 KiB write "
              f"{write_us:.0f} us, 1 MiB writes {seq_write:.0f} MiB/s, reads "
              f"{seq_read:.0f} MiB/s")  # fmt: skip
    finally:
        model.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--block-size", type=int, default=schema.BLOCK_SIZE)
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
        in_process(url, args.block_size, n // 4)
    finally:
        for worker in workers:
            worker.stop()
        if local is not None:
            local.terminate()
            local.wait()
        server.stop()


if __name__ == "__main__":
    main()
