#!/usr/bin/env python3
"""Build the golden store of format v1 (tests/data/golden-v1/) through real volfs mounts.

    sudo .venv/bin/python tests/data/make_golden_v1.py [OUT]      # default: beside this file

Run it once per format version, with the volfs of that version, and commit what it writes;
tests/test_golden.py mounts it with today's code. It writes:

* ``store/``: a store root (``FORMAT``, ``volumes/golden/``: header, usage, durable mark,
  checkpoint, log segments) holding one sized volume, 8 MiB (so 1 MiB segments);
* ``manifest.json``: every path in the volume with its type, mode, owner, size, link count,
  mtime, device number, symlink target, xattrs and the sha256 of its contents.

The volume's state is made in two mounts (``volfsd mount -f`` in a private store root): the
first ends with a clean unmount, which writes a checkpoint (EXTENTS and CHECKPOINT records);
the second leaves a log tail after that checkpoint and ends with SIGKILL of its worker, so
that a mount of the golden store replays both a checkpoint and a log (an fsync first makes
the tail durable, so that fsck verifies it too). The tail holds every record kind: INODE,
LINK, UNLINK, RENAME (also onto an existing name), EXCHANGE, WRITE, XATTR set and removed; the
checkpoint holds INODE, LINK, XATTR, EXTENTS and CHECKPOINT. The script reads the written files
back by the format spec in docs/ARCHITECTURE.md (not by volfs's code) and fails unless each
kind is there.

Contents are deterministic: data from a fixed seed, times set with utime. What the kernel
stamps itself (ctimes, the volume's id and creation time) differs from run to run.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack

HERE = Path(__file__).resolve().parent
NAME = "golden"
SIZE = "8M"
#: The store files that make a volume; runtime files (lock, device, reserve) are left out.
KEEP = ("volume", "usage", "durable", "checkpoint")
#: A fixed time for everything (2026-01-02 03:04:05.123456789 UTC), and one a day later.
T0 = 1767323045_123456789
T1 = T0 + 86400 * 10**9
KINDS = {1: "INODE", 2: "LINK", 3: "UNLINK", 4: "RENAME", 5: "EXCHANGE", 6: "WRITE",
         7: "XATTR", 9: "EXTENTS", 10: "CHECKPOINT"}  # fmt: skip
RENAME_EXCHANGE = 2
AT_FDCWD = -100


# -- mounting ----------------------------------------------------------------------------------


class Mount:
    """``volfsd mount -f`` of volume *name* (the golden one) in a private store root, at *path*."""

    def __init__(self, root: Path, path: Path, name: str = NAME) -> None:
        self.root, self.path = root, path
        env = {**os.environ, "VOLFS_ROOT": str(root), "VOLFS_RUN_DIR": str(root.parent / "run")}
        args = [sys.executable, "-m", "volfs", "mount", "-f", name, str(path)]
        if not (root / "volumes" / name).exists():
            args[5:5] = ["--size", SIZE]
        self.proc = subprocess.Popen(args, env=env)
        deadline = time.monotonic() + 30
        while not os.path.ismount(path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise SystemExit(f"make_golden: the mount at {path} did not come up")
            time.sleep(0.05)

    def stop(self) -> None:
        """A clean unmount: the worker writes a checkpoint and exits."""
        self.proc.send_signal(signal.SIGTERM)
        if self.proc.wait(timeout=60) != 0:
            raise SystemExit("make_golden: the worker did not stop cleanly")

    def kill(self) -> None:
        """SIGKILL the worker (what was acknowledged stays in the log) and detach its mount."""
        self.proc.kill()
        self.proc.wait()
        if os.path.ismount(self.path):
            subprocess.run(["fusermount3", "-uz", str(self.path)], check=False)


def exchange(a: Path, b: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a))


def data(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


# -- the two mounts' work ----------------------------------------------------------------------


def before_checkpoint(m: Path, rng: random.Random) -> None:
    """Everything the checkpoint will hold: files, holes, links, special files, xattrs."""
    (m / "docs").mkdir()
    (m / "docs" / "deep" / "er").mkdir(parents=True)
    (m / "docs" / "small.txt").write_bytes(b"hello, golden store\n")
    (m / "docs" / "blocks.bin").write_bytes(data(rng, 200_000))  # several 64 KiB blocks
    (m / "docs" / "deep" / "er" / "leaf").write_bytes(data(rng, 777))
    (m / "empty").write_bytes(b"")
    with open(m / "sparse", "wb") as f:  # holes before, between and after the data
        f.seek(65536)
        f.write(data(rng, 4096))
        f.seek(1 << 20)
        f.write(data(rng, 100))
        f.truncate(2 << 20)
    with open(m / "overwritten", "wb") as f:  # a write over an earlier one, then a shrink
        f.write(data(rng, 150_000))
        f.seek(70_000)
        f.write(b"X" * 5000)
        f.truncate(120_000)
    (m / "hard-a").write_bytes(data(rng, 3000))
    os.link(m / "hard-a", m / "docs" / "hard-b")
    os.link(m / "hard-a", m / "docs" / "deep" / "hard-c")
    os.symlink("docs/small.txt", m / "link-rel")
    os.symlink("/nonexistent/absolute/target", m / "link-abs")
    os.mkfifo(m / "fifo", 0o640)
    if os.geteuid() == 0:
        os.mknod(m / "null-dev", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    (m / ("n" * 255)).write_bytes(b"the longest name")
    (m / os.fsdecode(b"caf\xc3\xa9-\xff\xfe")).write_bytes(b"a name that is not UTF-8")
    os.setxattr(m / "docs" / "small.txt", "user.colour", b"blue")
    os.setxattr(m / "docs" / "small.txt", "user.binary", bytes(range(256)))
    os.setxattr(m / "docs", "user.on-a-dir", b"")
    os.setxattr(m / "hard-a", "user.removed", b"soon gone")
    os.removexattr(m / "hard-a", "user.removed")
    (m / "gone").write_bytes(b"unlinked before the checkpoint")
    os.unlink(m / "gone")
    (m / "renamed-old").write_bytes(b"renamed")
    os.rename(m / "renamed-old", m / "docs" / "renamed-new")
    (m / "victim").write_bytes(b"replaced by a rename")
    (m / "winner").write_bytes(b"renamed onto an existing name")
    os.rename(m / "winner", m / "victim")
    (m / "swap-a").write_bytes(b"was a")
    (m / "swap-b").mkdir()
    exchange(m / "swap-a", m / "swap-b")
    os.chmod(m / "docs" / "blocks.bin", 0o640)
    os.chown(m / "docs" / "deep" / "er" / "leaf", 1234, 5678)
    (m / "setgid").mkdir(mode=0o2775)
    os.chmod(m / "setgid", 0o2775)
    set_times(m, T0)


def after_checkpoint(m: Path, rng: random.Random) -> None:
    """The log tail: changes to what the checkpoint holds, and new things."""
    with open(m / "docs" / "blocks.bin", "r+b") as f:
        f.seek(100_000)
        f.write(data(rng, 10_000))
    with open(m / "overwritten", "ab") as f:
        f.write(b"appended after the checkpoint")
    with open(m / "sparse", "r+b") as f:
        f.seek(1536 << 10)
        f.write(data(rng, 5000))
    (m / "tail").mkdir()
    (m / "tail" / "new.bin").write_bytes(data(rng, 70_000))
    os.link(m / "tail" / "new.bin", m / "tail" / "new-link")
    os.unlink(m / "docs" / "hard-b")  # hard-a now has two links
    os.symlink("../hard-a", m / "tail" / "up")
    os.setxattr(m / "tail" / "new.bin", "user.tail", b"set in the tail")
    os.removexattr(m / "docs" / "small.txt", "user.colour")
    os.rename(m / "docs" / "renamed-new", m / "tail" / "renamed-again")
    (m / "tail" / "target").write_bytes(b"replaced in the tail")
    os.rename(m / "docs" / "deep" / "er" / "leaf", m / "tail" / "target")
    exchange(m / "tail" / "new-link", m / "docs" / "small.txt")
    os.truncate(m / "empty", 10)  # grows: a hole of 10 bytes
    os.rmdir(m / "swap-a")  # the directory that swap-a became
    set_times(m, T1)
    fd = os.open(m / "tail" / "new.bin", os.O_RDONLY)
    try:
        os.fsync(fd)  # the whole log durable: the mark covers the tail
    finally:
        os.close(fd)


def set_times(m: Path, ns: int) -> None:
    """Fixed atime and mtime for every path (directories last, as entries change them)."""
    paths = sorted(walk(m), key=lambda p: (p.is_dir() and not p.is_symlink(), -len(p.parts)))
    for i, path in enumerate([*paths, m]):
        os.utime(path, ns=(ns + i, ns + 1000 * i), follow_symlinks=False)


def walk(top: Path) -> Iterator[Path]:
    for entry in sorted(os.scandir(top), key=lambda e: e.name):
        path = Path(entry.path)
        yield path
        if entry.is_dir(follow_symlinks=False):
            yield from walk(path)


# -- the manifest ------------------------------------------------------------------------------


def describe(path: Path, top: Path) -> dict[str, object]:
    st = path.lstat()
    kind = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
            stat.S_IFIFO: "fifo", stat.S_IFCHR: "chardev", stat.S_IFBLK: "blockdev",
            stat.S_IFSOCK: "socket"}[stat.S_IFMT(st.st_mode)]  # fmt: skip
    entry: dict[str, object] = {
        "path": "/" + os.fsdecode(path.relative_to(top)) if path != top else "/",
        "type": kind,
        "mode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "size": st.st_size,
        "nlink": st.st_nlink,
        "mtime_ns": st.st_mtime_ns,
    }
    if kind == "file":
        entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    elif kind == "symlink":
        entry["target"] = os.readlink(path)
    elif kind in ("chardev", "blockdev"):
        entry["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
    if kind != "symlink":
        entry["xattrs"] = {n: os.getxattr(path, n).hex() for n in sorted(os.listxattr(path))}
    return entry


def manifest(top: Path) -> list[dict[str, object]]:
    return [describe(p, top) for p in [top, *walk(top)]]


# -- reading the format, by the spec -----------------------------------------------------------


def frames(path: Path) -> Iterator[tuple[int, object]]:
    """The offsets and meta parts of the frames in a segment or checkpoint file (ARCHITECTURE's
    layout: u32 meta_len, u32 data_len, u64 checksum, meta, data)."""
    raw = path.read_bytes()
    pos = 0
    while pos + 16 <= len(raw):
        meta_len, data_len = struct.unpack_from("<II", raw, pos)
        if meta_len == 0 and data_len == 0:
            break  # zeros past the end of the frames
        yield pos, msgpack.unpackb(raw[pos + 16 : pos + 16 + meta_len], raw=True)
        pos += 16 + meta_len + data_len


def record_kinds(volume_dir: Path) -> tuple[set[str], set[str]]:
    """The record kinds in the checkpoint, and in the log after the position it covers."""
    records = [r for _, meta in frames(volume_dir / "checkpoint") for r in meta]
    checkpoint = {KINDS[r[0]] for r in records}
    _, _, start_seg, start_pos, _ = records[0]  # [10, format, segment, offset, next_ino]
    tail = set()
    for seg in sorted(volume_dir.glob("seg-*.log")):
        number = int(seg.name[4:-4])
        for pos, meta in frames(seg):
            if (number, pos) >= (start_seg, start_pos) and pos > 0:  # not the segment header
                tail |= {KINDS[r[0]] for r in meta}
    return checkpoint, tail


# -- main --------------------------------------------------------------------------------------


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "golden-v1"
    if os.geteuid() != 0:
        print("make_golden_v1: run as root (device nodes, chown, allow_other)", file=sys.stderr)
        return 2
    rng = random.Random(20261201)
    with tempfile.TemporaryDirectory(prefix="volfs-golden-") as tmp:
        root, mnt = Path(tmp) / "store", Path(tmp) / "mnt"
        first = Mount(root, mnt)
        try:
            before_checkpoint(mnt, rng)
        except BaseException:
            first.kill()
            raise
        first.stop()
        second = Mount(root, mnt)
        try:
            after_checkpoint(mnt, rng)
            listing = manifest(mnt)
        finally:
            second.kill()  # no clean unmount: the tail stays a tail
        volume_dir = root / "volumes" / NAME
        checkpoint, tail = record_kinds(volume_dir)
        want_tail = {"INODE", "LINK", "UNLINK", "RENAME", "EXCHANGE", "WRITE", "XATTR"}
        if {"CHECKPOINT", "EXTENTS"} - checkpoint or want_tail - tail:
            print(f"make_golden_v1: missing record kinds: checkpoint has {sorted(checkpoint)}, "
                  f"the log tail {sorted(tail)}", file=sys.stderr)  # fmt: skip
            return 1
        if out.exists():
            shutil.rmtree(out)
        (out / "store" / "volumes" / NAME).mkdir(parents=True)
        shutil.copyfile(root / "FORMAT", out / "store" / "FORMAT")
        for name in [*KEEP, *sorted(p.name for p in volume_dir.glob("seg-*.log"))]:
            shutil.copyfile(volume_dir / name, out / "store" / "volumes" / NAME / name)
        (out / "manifest.json").write_text(json.dumps(listing, indent=1) + "\n")
    print(f"make_golden_v1: wrote {out}: checkpoint {sorted(checkpoint)}, log tail "
          f"{sorted(tail)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
