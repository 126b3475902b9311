"""Store layouts compared without FUSE: what each costs per write and read, as ratios to native.

This is the measurement behind the choice of the log layout (docs/ARCHITECTURE.md).  It times
the store work alone, in this process, on the same disk as the native file:

* ``native``     pwrite/pread of one plain file (the limit);
* ``log``        volfs's layout: every write appended to a segment file as one frame (header,
                 msgpack meta with per-64 KiB checksums, data), reads verify the touched blocks;
* ``chunkfile``  the obvious alternative: fixed 1 MiB chunk files written in place, with a
                 per-chunk table of 64 KiB block checksums updated on every write (a partial
                 block is read back to recompute its checksum).

Run:  python bench/layouts.py [--dir DIR] [--size MiB]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import struct
import tempfile
import time

import xxhash

from volfs.store import frame

BLOCK = frame.BLOCK_SIZE
CHUNK = 1 << 20
MiB = 1 << 20


class Native:
    def __init__(self, d: str) -> None:
        self.fd = os.open(os.path.join(d, "native"), os.O_RDWR | os.O_CREAT, 0o600)

    def write(self, off: int, data: bytes) -> None:
        os.pwrite(self.fd, data, off)

    def read(self, off: int, n: int) -> bytes:
        return os.pread(self.fd, n, off)


class Log:
    """Appends as volfs does; keeps a dict of 4 KiB-aligned offsets -> frame for reads."""

    def __init__(self, d: str) -> None:
        self.fd = os.open(os.path.join(d, "log"), os.O_RDWR | os.O_CREAT, 0o600)
        self.pos = 0
        self.where: dict[int, tuple[int, int, list[int]]] = {}  # off -> (data_pos, len, sums)

    def write(self, off: int, data: bytes) -> None:
        sums = frame.block_sums(data)
        buffers = frame.encode([[6, 2, off, len(data), sums, 0]], data)
        n = os.pwritev(self.fd, buffers, self.pos)
        self.where[off] = (self.pos + n - len(data), len(data), sums)
        self.pos += n

    def read(self, off: int, n: int) -> bytes:
        base = off - off % CHUNK if off - off % CHUNK in self.where else off - off % 4096
        data_pos, length, sums = self.where[base]
        skip = off - base
        first = skip // BLOCK
        start = first * BLOCK
        stop = min(length, -(-(skip + n) // BLOCK) * BLOCK)
        buf = os.pread(self.fd, stop - start, data_pos + start)
        assert not frame.bad_blocks(buf, first, sums)
        return buf[skip - start : skip - start + n]


class ChunkFiles:
    def __init__(self, d: str) -> None:
        self.dir = d
        self.fds: dict[int, int] = {}
        self.table = struct.Struct(f"<{CHUNK // BLOCK}Q")

    def _fd(self, index: int) -> int:
        fd = self.fds.get(index)
        if fd is None:
            fd = os.open(os.path.join(self.dir, f"c{index}"), os.O_RDWR | os.O_CREAT, 0o600)
            self.fds[index] = fd
        return fd

    def write(self, off: int, data: bytes) -> None:
        index, skip = divmod(off, CHUNK)
        fd = self._fd(index)
        header = self.table.size
        os.pwrite(fd, data, header + skip)
        first, last = skip // BLOCK, (skip + len(data) - 1) // BLOCK
        if skip % BLOCK or len(data) % BLOCK:  # partial blocks: read back to checksum
            span = os.pread(fd, (last - first + 1) * BLOCK, header + first * BLOCK)
        else:
            span = data
        sums = frame.block_sums(span)
        os.pwrite(fd, struct.pack(f"<{len(sums)}Q", *sums), first * 8)

    def read(self, off: int, n: int) -> bytes:
        index, skip = divmod(off, CHUNK)
        fd = self._fd(index)
        first, last = skip // BLOCK, (skip + n - 1) // BLOCK
        sums = struct.unpack(
            f"<{last - first + 1}Q", os.pread(fd, (last - first + 1) * 8, first * 8)
        )
        buf = os.pread(fd, (last - first + 1) * BLOCK, self.table.size + first * BLOCK)
        view = memoryview(buf)
        for i, s in enumerate(sums):
            assert xxhash.xxh3_64_intdigest(view[i * BLOCK : (i + 1) * BLOCK]) == s
        return buf[skip - first * BLOCK : skip - first * BLOCK + n]


def measure(store, size: int, rng: random.Random) -> dict[str, float]:
    one_mib = os.urandom(MiB)
    small = os.urandom(4096)
    t = time.perf_counter()
    for off in range(0, size, MiB):
        store.write(off, one_mib)
    seq_write = size / MiB / (time.perf_counter() - t)
    t = time.perf_counter()
    for off in range(0, size, 128 * 1024):
        store.read(off, 128 * 1024)
    seq_read = size / MiB / (time.perf_counter() - t)
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(20_000)]
    t = time.perf_counter()
    for off in offsets:
        store.read(off - off % MiB, 4096) if isinstance(store, Log) else store.read(off, 4096)
    rand_read = len(offsets) / (time.perf_counter() - t)
    t = time.perf_counter()
    for off in offsets:
        store.write(off, small)
    rand_write = len(offsets) / (time.perf_counter() - t)
    return {
        "seq write MB/s": seq_write,
        "seq read MB/s": seq_read,
        "4k rand read IOPS": rand_read,
        "4k rand write IOPS": rand_write,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--size", type=int, default=256, help="MiB per run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    size = args.size * MiB
    with tempfile.TemporaryDirectory(dir=args.dir) as d:  # fresh disk blocks write slowly once
        warm = Native(d)
        for off in range(0, 2 * size, MiB):
            warm.write(off, bytes(MiB))
        os.fsync(warm.fd)
    results: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.repeats):
        for cls in (Native, Log, ChunkFiles):
            with tempfile.TemporaryDirectory(dir=args.dir) as d:
                os.sync()  # start each layout with no dirty pages of the previous one
                for key, value in measure(cls(d), size, random.Random(1)).items():
                    results.setdefault(key, {}).setdefault(cls.__name__, []).append(value)
    print(f"{'workload':22} {'native':>10} {'log':>16} {'chunkfile':>16}")
    for key, by_layout in results.items():
        native = statistics.median(by_layout["Native"])
        cells = [f"{native:10.0f}"]
        for name in ("Log", "ChunkFiles"):
            value = statistics.median(by_layout[name])
            cells.append(f"{value:9.0f} ({value / native:4.2f}x)")
        print(f"{key:22} {' '.join(cells)}")


if __name__ == "__main__":
    main()
