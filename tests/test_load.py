"""Load: several processes through two mount paths of one volume, verifying every byte.

Each worker process writes self-checking files (a checksum of the rest in the first 8 bytes)
under a temporary name and renames them into place, reads back files of every worker through
either path, renames and deletes its own.  Afterwards: no worker saw an error or a wrong
byte, every file left is intact, and the serving process's memory stayed bounded.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import time
from pathlib import Path

import pytest
import xxhash

from helpers import needs_root, volfsd

WORKERS = 4
#: Most memory the serving process may reach under this load (its steady state is ~50 MiB).
RSS_LIMIT_MIB = 400


def _content(rng: random.Random) -> bytes:
    body = rng.randbytes(rng.choice([100, 4096, 70_000, 300_000, 1 << 20]))
    return xxhash.xxh64_intdigest(body).to_bytes(8, "little") + body


def _intact(data: bytes) -> bool:
    return len(data) >= 8 and xxhash.xxh64_intdigest(data[8:]).to_bytes(8, "little") == data[:8]


def _worker(me: int, paths: list[str], seconds: float, errors) -> None:
    rng = random.Random(me)
    mine: list[str] = []
    deadline = time.monotonic() + seconds
    n = 0
    try:
        while time.monotonic() < deadline:
            n += 1
            base = rng.choice(paths)
            op = rng.random()
            if op < 0.4 or not mine:
                name = f"w{me}-{n}"
                tmp = os.path.join(base, f".tmp-{name}")
                with open(tmp, "wb") as f:
                    f.write(_content(rng))
                os.rename(tmp, os.path.join(base, name))
                mine.append(name)
            elif op < 0.75:
                names = [e for e in os.listdir(base) if not e.startswith(".")]
                for name in rng.sample(names, min(3, len(names))):
                    try:
                        with open(os.path.join(base, name), "rb") as f:
                            data = f.read()
                    except FileNotFoundError:
                        continue  # its owner renamed or deleted it meanwhile
                    if not _intact(data):
                        zeros = data.count(0)
                        errors.put(f"worker {me}: {name} through {base} has wrong bytes "
                                   f"({len(data)} bytes, {zeros} of them zeros)")  # fmt: skip
            elif op < 0.88:
                old = mine.pop(rng.randrange(len(mine)))
                new = f"w{me}-{n}-renamed"
                # Within one path: Linux refuses rename across mounts, binds of one included.
                os.rename(os.path.join(base, old), os.path.join(base, new))
                mine.append(new)
            else:
                os.unlink(os.path.join(base, mine.pop(rng.randrange(len(mine)))))
    except OSError as exc:
        errors.put(f"worker {me}: {exc!r}")


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@needs_root("a second mount path needs bind mounts (root)")
@pytest.mark.parametrize("seconds", [4, pytest.param(180, marks=pytest.mark.slow)])
def test_load_through_two_paths(volume, tmp_path, seconds):
    first = volume.mount(tmp_path / "one")
    second = volume.mount(tmp_path / "two")
    server = volume.pid
    ctx = multiprocessing.get_context("fork")
    errors = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(i, [str(first), str(second)], seconds, errors))
        for i in range(WORKERS)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(seconds + 120)
        assert proc.exitcode == 0, f"load worker ended with {proc.exitcode}"
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert not found, found[:10]
    names = os.listdir(first)
    assert sorted(names) == sorted(os.listdir(second))
    assert names, "the load wrote nothing"
    for name in names:
        assert _intact((first / name).read_bytes()), name
    assert _peak_rss_mib(server) < RSS_LIMIT_MIB
    volfsd("umount", str(first), root=volume.root)
    volume.unmount()  # the last path: the server ends; everything is there after a remount
    again = volume.mount()
    assert sorted(os.listdir(again)) == sorted(names)
    assert all(_intact((again / n).read_bytes()) for n in names)
