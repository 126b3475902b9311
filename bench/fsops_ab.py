"""The CPU cost of the FUSE handlers themselves, in-process, without the kernel.

Drives `VolumeOperations` on a real store in a scratch directory (no mount, no fsync), so what
it measures is the handlers' own Python work plus the store's journaling: the part a change
of fsops can make dearer.  Run it with the venv of each checkout to compare two of them:

    .venv/bin/python bench/fsops_ab.py                  # this checkout
    /path/to/other/.venv/bin/python bench/fsops_ab.py   # the other one, same machine

It prints CPU microseconds per handler call (process time, so other processes on the machine
count less; the best and the median of --repeats runs).  `bench/run.py` measures what users
see through the kernel.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from volfs.fsops import VolumeOperations
from volfs.store.root import StoreRoot

try:  # checkouts with the model seam
    from volfs.localmodel import LocalModel
except ImportError:  # older ones: the operations take the volume itself
    LocalModel = None  # type: ignore[assignment,misc]

ROOT = 1
PAYLOAD = os.urandom(4096)


@dataclass
class Ctx:
    uid: int = 0
    gid: int = 0
    pid: int = 1
    umask: int = 0o022


CTX = Ctx()


def make_ops(volume: Any) -> Any:
    return VolumeOperations(volume if LocalModel is None else LocalModel(volume))


async def smallfiles(ops: Any, count: int) -> None:
    """create + write 4 KiB + release, lookup + getattr, open + read + release, unlink."""
    for i in range(count):
        name = b"f%06d" % i
        info, entry = await ops.create(ROOT, name, 0o644, os.O_WRONLY, CTX)
        await ops.write(info.fh, 0, PAYLOAD)
        await ops.release(info.fh)
    for i in range(count):
        entry = await ops.lookup(ROOT, b"f%06d" % i, CTX)
        await ops.getattr(entry.st_ino, CTX)
        info = await ops.open(entry.st_ino, os.O_RDONLY, CTX)
        await ops.read(info.fh, 0, 4096)
        await ops.release(info.fh)
        await ops.forget([(entry.st_ino, 2)])
    for i in range(count):
        await ops.unlink(ROOT, b"f%06d" % i, CTX)


async def randwrite(ops: Any, count: int) -> None:
    """4 KiB writes at random 4 KiB offsets of a 64 MiB file."""
    info, _ = await ops.create(ROOT, b"big", 0o644, os.O_WRONLY, CTX)
    rng = random.Random(1)
    for _ in range(count):
        await ops.write(info.fh, rng.randrange(16384) * 4096, PAYLOAD)
    await ops.release(info.fh)
    await ops.unlink(ROOT, b"big", CTX)


async def metadata(ops: Any, count: int) -> None:
    """getattr and lookup of one existing name: the requests with the least work of their own."""
    entry = await ops.mkdir(ROOT, b"d", 0o755, CTX)
    for _ in range(count):
        await ops.getattr(entry.st_ino, CTX)
        await ops.lookup(ROOT, b"d", CTX)
        await ops.lookup(ROOT, b"missing", CTX)
    await ops.rmdir(ROOT, b"d", CTX)


#: workload -> (function, handler calls per unit of count)
WORKLOADS: dict[str, tuple[Callable[[Any, int], Awaitable[None]], int]] = {
    "smallfiles": (smallfiles, 10),
    "randwrite4k": (randwrite, 1),
    "metadata": (metadata, 3),
}


def measure(top: Path, name: str, count: int) -> float:
    """Microseconds per handler call of one run of workload *name* on a fresh volume."""
    store_dir = top / name
    shutil.rmtree(store_dir, ignore_errors=True)
    root = StoreRoot(store_dir)
    root.create_volume("bench")
    volume = root.open_volume("bench")
    run, calls = WORKLOADS[name]
    try:
        ops = make_ops(volume)
        start = time.process_time()
        trio.run(run, ops, count)
        elapsed = time.process_time() - start
    finally:
        volume.close(checkpoint=False)
    return elapsed / (count * calls) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--count", type=int, default=3000, help="files, writes or lookups per run")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    top = Path(tempfile.mkdtemp(prefix="volfs-fsops-ab-", dir="/var/tmp"))
    try:
        seam = "with" if LocalModel is not None else "without"
        print(f"{'workload':12} {'us/call (best)':>15} {'median':>8}  ({seam} the model seam)")
        for name in WORKLOADS:
            times = sorted(measure(top, name, args.count) for _ in range(args.repeats))
            print(f"{name:12} {times[0]:15.2f} {times[len(times) // 2]:8.2f}")
    finally:
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
