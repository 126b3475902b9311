"""The FUSE operations driven in-process, without the kernel: each POSIX rule of
`volfs.posix` through `VolumeOperations` on a real store, with the errno of each refusal.

The kernel tier (test_ops.py, test_access.py) shows what users see through a mount, where the
kernel decides some things first (mode checks, with ``default_permissions``; the sticky bit;
names it already has in its caches).  Here each handler gets exactly the request a test
builds, so rules the kernel would shield (a setattr of size on a directory, a link of an
unlinked file, renameat2's flag checks) are reached directly, and a test takes milliseconds.
"""

from __future__ import annotations

import errno
import os
import random
import stat
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from volfs.fsops import VolumeOperations
from volfs.localmodel import LocalModel
from volfs.pg import check
from volfs.pg.model import PgModel
from volfs.pg.schema import connect, create_volume
from volfs.posix import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
)
from volfs.store.log import segment_name
from volfs.store.root import StoreRoot
from volfs.store.volume import Volume

pytest_plugins = ["pg"]  # its fixtures: pg_server, pg_url

ROOT = pyfuse3.ROOT_INODE


@dataclass
class Ctx:
    """What pyfuse3's `RequestContext` tells a handler about the caller."""

    uid: int = 0
    gid: int = 0
    pid: int = 1
    umask: int = 0o022


ROOT_USER = Ctx()
USER = Ctx(uid=1000, gid=1000)


@dataclass
class Fields:
    """pyfuse3's `SetattrFields` (whose attributes pyfuse3 sets only from a request)."""

    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False


class Fs:
    """A volume's operations with each async handler callable as a plain function."""

    def __init__(self, ops: VolumeOperations, volume: Volume) -> None:
        self.ops = ops
        self.volume = volume

    def lookups(self, ino: int) -> int:
        """The lookup count the operations keep for inode *ino*."""
        return self.volume.inodes[ino].lookups

    def set_limits(self, size: int, inodes: int) -> None:
        self.volume.set_limits(size, inodes)

    def close(self) -> None:
        self.volume.close()

    def __getattr__(self, name: str) -> Any:
        handler = getattr(self.ops, name)
        return lambda *args: trio.run(handler, *args)

    def errno_of(self, name: str, *args: Any, **kwargs: Any) -> int:
        with pytest.raises(pyfuse3.FUSEError) as info:
            getattr(self, name)(*args, **kwargs)
        return info.value.errno

    # -- shorthands ---------------------------------------------------------------------------

    def ino(self, *path: bytes) -> int:
        parent = ROOT
        for name in path:
            entry = self.lookup(parent, name, Ctx())
            assert entry.st_ino, f"{name!r} is missing"
            parent = entry.st_ino
        return parent

    def file(self, parent: int, name: bytes, data: bytes = b"", ctx: Ctx = ROOT_USER) -> int:
        info, entry = self.create(parent, name, 0o644, os.O_WRONLY, ctx)
        if data:
            self.write(info.fh, 0, data)
        self.release(info.fh)
        return entry.st_ino

    def dir(self, parent: int, name: bytes, ctx: Ctx = ROOT_USER, mode: int = 0o755) -> int:
        return self.mkdir(parent, name, mode, ctx).st_ino

    def names(self, ino: int) -> set[bytes]:
        return set(self.volume.inodes[ino].entries)

    def setattr_(self, ino: int, ctx: Ctx = ROOT_USER, **values: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        flags = Fields()
        for key, value in values.items():
            setattr(attr, f"st_{key}", value)
            field = "update_" + key.removesuffix("_ns")
            assert field in {f.name for f in fields(Fields)}
            setattr(flags, field, True)
        return self.setattr(ino, attr, flags, None, ctx)


class PgFs(Fs):
    """`Fs` on a volume of the PostgreSQL engine (`volfs.pg`)."""

    def __init__(self, url: str) -> None:
        create_volume(url, "v")
        self.model = PgModel(url, "v")
        self.model.open()
        self.ops = VolumeOperations(self.model)
        self.conn = connect(url)

    def names(self, ino: int) -> set[bytes]:
        rows = self.conn.execute(
            "SELECT name FROM entries WHERE volume = %s AND parent = %s", (self.model.vid, ino)
        ).fetchall()
        return {bytes(name) for (name,) in rows}

    def lookups(self, ino: int) -> int:
        return self.model.count_of(ino, 0)

    def set_limits(self, size: int, inodes: int) -> None:
        self.conn.execute("UPDATE volumes SET quota = %s, inode_limit = %s WHERE id = %s",
                          (size, inodes, self.model.vid))  # fmt: skip

    def close(self) -> None:
        try:
            assert check.problems(self.conn, self.model.vid, unlinked_ok=True) == []
        finally:
            self.conn.close()
            self.model.close()


def _open_fs(root: StoreRoot, read_only: bool = False, name: str = "v") -> Fs:
    volume = root.open_volume(name)
    return Fs(VolumeOperations(LocalModel(volume), read_only=read_only), volume)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StoreRoot]:
    root = StoreRoot(tmp_path / "store")
    root.create_volume("v")
    yield root


@pytest.fixture(params=["local", "pg"])
def fs(request: pytest.FixtureRequest) -> Iterator[Fs]:
    """The operations on a volume of each model: one set of POSIX rules for both."""
    if request.param == "pg":
        fs: Fs = PgFs(request.getfixturevalue("pg_url"))
    else:
        fs = _open_fs(request.getfixturevalue("store"))
    try:
        yield fs
    finally:
        fs.close()


# -- lookups and names -----------------------------------------------------------------------


def test_lookup_missing_is_a_negative_entry(fs):
    entry = fs.lookup(ROOT, b"nope", Ctx())
    assert entry.st_ino == 0 and entry.entry_timeout > 0
    assert fs.errno_of("lookup", ROOT, b"n" * 256, Ctx()) == errno.ENAMETOOLONG
    f = fs.file(ROOT, b"f")
    assert fs.errno_of("lookup", f, b"x", Ctx()) == errno.ENOTDIR
    assert fs.errno_of("getattr", 999, Ctx()) == errno.ENOENT


def test_lookup_counts_references(fs):
    f = fs.file(ROOT, b"f")
    before = fs.lookups(f)
    fs.lookup(ROOT, b"f", Ctx())
    fs.lookup(ROOT, b"f", Ctx())
    assert fs.lookups(f) == before + 2
    fs.forget([(f, 2)])
    assert fs.lookups(f) == before


def test_new_names_are_checked(fs):
    fs.file(ROOT, b"f")
    assert fs.errno_of("create", ROOT, b"f", 0o644, os.O_WRONLY | os.O_EXCL, Ctx()) == errno.EEXIST
    # Without O_EXCL a name that exists is opened: the kernel asks only for a name it found
    # missing, but on a volume several hosts serve another one may have made it since.
    info, entry = fs.create(ROOT, b"f", 0o644, os.O_WRONLY, Ctx())
    assert entry.st_ino == fs.ino(b"f")
    fs.release(info.fh)
    assert fs.errno_of("mkdir", ROOT, b"d" * 256, 0o755, Ctx()) == errno.ENAMETOOLONG
    assert fs.errno_of("mknod", ROOT, b"dir", stat.S_IFDIR | 0o755, 0, Ctx()) == errno.EINVAL
    assert fs.errno_of("symlink", ROOT, b"l", b"t" * 4096, Ctx()) == errno.ENAMETOOLONG
    assert fs.errno_of("mkdir", fs.ino(b"f"), b"x", 0o755, Ctx()) == errno.ENOTDIR


def test_new_inodes_take_the_callers_ids_and_umask(fs):
    ctx = Ctx(uid=1000, gid=1000, umask=0o027)
    entry = fs.mkdir(ROOT, b"d", 0o777, ctx)
    assert (entry.st_uid, entry.st_gid, stat.S_IMODE(entry.st_mode)) == (1000, 1000, 0o750)
    node = fs.mknod(ROOT, b"fifo", stat.S_IFIFO | 0o666, 0, ctx)
    assert stat.S_ISFIFO(node.st_mode) and stat.S_IMODE(node.st_mode) == 0o640
    link = fs.symlink(ROOT, b"l", b"../target", ctx)
    assert stat.S_IMODE(link.st_mode) == 0o777 and link.st_size == len(b"../target")
    assert fs.readlink(link.st_ino, ctx) == b"../target"
    assert fs.errno_of("readlink", entry.st_ino, ctx) == errno.EINVAL


def test_setgid_directory_passes_its_group_on(fs):
    d = fs.dir(ROOT, b"shared", mode=0o2775)
    fs.setattr_(d, gid=50)
    sub = fs.mkdir(d, b"sub", 0o755, USER)
    assert sub.st_gid == 50 and sub.st_mode & stat.S_ISGID
    _, f = fs.create(d, b"f", 0o644, os.O_WRONLY, USER)
    assert f.st_gid == 50 and not f.st_mode & stat.S_ISGID
    plain = fs.mkdir(ROOT, b"plain", 0o755, USER)
    assert plain.st_gid == 1000 and not plain.st_mode & stat.S_ISGID


# -- removing names ------------------------------------------------------------------------------


def test_unlink_and_rmdir_refuse_the_wrong_kind(fs):
    d = fs.dir(ROOT, b"d")
    fs.file(d, b"inside")
    fs.file(ROOT, b"f")
    assert fs.errno_of("unlink", ROOT, b"d", Ctx()) == errno.EISDIR
    assert fs.errno_of("rmdir", ROOT, b"f", Ctx()) == errno.ENOTDIR
    assert fs.errno_of("rmdir", ROOT, b"d", Ctx()) == errno.ENOTEMPTY
    assert fs.errno_of("unlink", ROOT, b"nope", Ctx()) == errno.ENOENT
    fs.unlink(d, b"inside", Ctx())
    fs.rmdir(ROOT, b"d", Ctx())
    fs.unlink(ROOT, b"f", Ctx())
    assert fs.names(ROOT) == set()


def test_hard_links(fs):
    f = fs.file(ROOT, b"f", b"data")
    d = fs.dir(ROOT, b"d")
    entry = fs.link(f, d, b"again", Ctx())
    assert entry.st_ino == f and entry.st_nlink == 2
    assert fs.errno_of("link", f, d, b"again", Ctx()) == errno.EEXIST
    assert fs.errno_of("link", d, ROOT, b"dirlink", Ctx()) == errno.EPERM
    assert fs.errno_of("link", f, d, b"x" * 256, Ctx()) == errno.ENAMETOOLONG
    fs.unlink(ROOT, b"f", Ctx())
    assert fs.getattr(f, Ctx()).st_nlink == 1
    info = fs.open(f, os.O_RDONLY, Ctx())
    assert fs.read(info.fh, 0, 10) == b"data"
    fs.unlink(d, b"again", Ctx())
    # Unlinked but open: it cannot get a name again (linkat of /proc/self/fd/N).
    assert fs.errno_of("link", f, ROOT, b"back", Ctx()) == errno.ENOENT
    assert fs.read(info.fh, 0, 10) == b"data"
    fs.release(info.fh)


# -- renames ---------------------------------------------------------------------------------------


def test_rename_replaces_and_refuses_by_kind(fs):
    fs.file(ROOT, b"a", b"A")
    fs.file(ROOT, b"b", b"B")
    d = fs.dir(ROOT, b"d")
    full = fs.dir(ROOT, b"full")
    fs.file(full, b"x")
    empty = fs.dir(ROOT, b"empty")
    assert fs.errno_of("rename", ROOT, b"a", ROOT, b"d", 0, Ctx()) == errno.EISDIR
    assert fs.errno_of("rename", ROOT, b"d", ROOT, b"a", 0, Ctx()) == errno.ENOTDIR
    assert fs.errno_of("rename", ROOT, b"d", ROOT, b"full", 0, Ctx()) == errno.ENOTEMPTY
    assert fs.errno_of("rename", ROOT, b"nope", ROOT, b"z", 0, Ctx()) == errno.ENOENT
    assert fs.errno_of("rename", ROOT, b"a", ROOT, b"z" * 256, 0, Ctx()) == errno.ENAMETOOLONG
    a = fs.ino(b"a")
    fs.rename(ROOT, b"a", ROOT, b"b", 0, Ctx())
    assert fs.ino(b"b") == a and b"a" not in fs.names(ROOT)
    fs.rename(ROOT, b"d", ROOT, b"empty", 0, Ctx())
    assert fs.ino(b"empty") == d and fs.getattr(empty, Ctx()).st_nlink == 0


def test_rename_into_its_own_subtree_is_einval(fs):
    top = fs.dir(ROOT, b"top")
    mid = fs.dir(top, b"mid")
    fs.dir(mid, b"low")
    assert fs.errno_of("rename", ROOT, b"top", mid, b"top", 0, Ctx()) == errno.EINVAL
    assert fs.errno_of("rename", top, b"mid", mid, b"x", 0, Ctx()) == errno.EINVAL
    assert fs.errno_of("rename", ROOT, b"top", mid, b"low", RENAME_EXCHANGE, Ctx()) == errno.EINVAL


def test_rename_of_two_links_to_one_inode_does_nothing(fs):
    f = fs.file(ROOT, b"f")
    fs.link(f, ROOT, b"g", Ctx())
    fs.rename(ROOT, b"f", ROOT, b"g", 0, Ctx())
    assert fs.names(ROOT) == {b"f", b"g"} and fs.getattr(f, Ctx()).st_nlink == 2


def test_rename_noreplace(fs):
    fs.file(ROOT, b"a")
    fs.file(ROOT, b"b")
    assert fs.errno_of("rename", ROOT, b"a", ROOT, b"b", RENAME_NOREPLACE, Ctx()) == errno.EEXIST
    fs.rename(ROOT, b"a", ROOT, b"c", RENAME_NOREPLACE, Ctx())
    assert fs.names(ROOT) == {b"b", b"c"}


def test_rename_exchange(fs):
    f = fs.file(ROOT, b"f", b"file")
    d = fs.dir(ROOT, b"d")
    fs.file(d, b"inside")
    fs.rename(ROOT, b"f", ROOT, b"d", RENAME_EXCHANGE, Ctx())
    assert fs.ino(b"f") == d and fs.ino(b"d") == f and fs.ino(b"f", b"inside")
    assert fs.errno_of("rename", ROOT, b"f", ROOT, b"nope", RENAME_EXCHANGE, Ctx()) == errno.ENOENT


def test_rename_flags_are_checked(fs):
    fs.file(ROOT, b"a")
    both = RENAME_NOREPLACE | RENAME_EXCHANGE
    assert fs.errno_of("rename", ROOT, b"a", ROOT, b"b", both, Ctx()) == errno.EINVAL
    assert fs.errno_of("rename", ROOT, b"a", ROOT, b"b", 4, Ctx()) == errno.EINVAL  # WHITEOUT


# -- attributes, truncation and data -------------------------------------------------------------


def test_setattr_changes_only_what_is_asked(fs):
    f = fs.file(ROOT, b"f", b"0123456789")
    before = fs.getattr(f, Ctx())
    after = fs.setattr_(f, mode=stat.S_IFDIR | 0o4711, atime_ns=5)
    assert after.st_mode == stat.S_IFREG | 0o4711  # the type stays
    assert after.st_atime_ns == 5 and after.st_mtime_ns == before.st_mtime_ns
    assert after.st_ctime_ns >= before.st_ctime_ns and after.st_size == 10
    chowned = fs.setattr_(f, uid=7, gid=8, ctime_ns=3)
    assert (chowned.st_uid, chowned.st_gid, chowned.st_ctime_ns) == (7, 8, 3)


def test_truncate(fs):
    f = fs.file(ROOT, b"f", b"0123456789")
    mtime = fs.getattr(f, Ctx()).st_mtime_ns
    fs.setattr_(f, size=4)
    info = fs.open(f, os.O_RDWR, Ctx())
    assert fs.read(info.fh, 0, 100) == b"0123"
    grown = fs.setattr_(f, size=8)
    assert fs.read(info.fh, 0, 100) == b"0123" + bytes(4)
    assert grown.st_mtime_ns >= mtime  # a truncation is a modification
    fs.release(info.fh)
    d = fs.dir(ROOT, b"d")
    link = fs.symlink(ROOT, b"l", b"f", Ctx()).st_ino
    assert fs.errno_of("setattr_", d, Ctx(), size=0) == errno.EISDIR
    assert fs.errno_of("setattr_", link, Ctx(), size=0) == errno.EINVAL


def test_open_trunc_and_kinds(fs):
    f = fs.file(ROOT, b"f", b"data")
    info = fs.open(f, os.O_WRONLY | os.O_TRUNC, Ctx())
    assert fs.getattr(f, Ctx()).st_size == 0
    fs.release(info.fh)
    d = fs.dir(ROOT, b"d")
    link = fs.symlink(ROOT, b"l", b"f", Ctx()).st_ino
    assert fs.errno_of("open", d, os.O_RDONLY, Ctx()) == errno.EISDIR
    assert fs.errno_of("open", link, os.O_RDONLY, Ctx()) == errno.EINVAL


def test_write_and_read_back(fs):
    info, entry = fs.create(ROOT, b"f", 0o644, os.O_RDWR, Ctx())
    assert fs.write(info.fh, 0, b"hello") == 5
    assert fs.write(info.fh, 10, b"world") == 5
    assert fs.read(info.fh, 0, 100) == b"hello" + bytes(5) + b"world"
    assert fs.read(info.fh, 100, 10) == b""
    fs.fsync(info.fh, False)
    fs.release(info.fh)
    assert fs.getattr(entry.st_ino, Ctx()).st_size == 15


def test_fallocate_modes_and_ranges(fs):
    info, entry = fs.create(ROOT, b"f", 0o644, os.O_RDWR, Ctx())
    assert fs.errno_of("fallocate", info.fh, 0x08, 0, 4096) == errno.EOPNOTSUPP  # collapse
    assert fs.errno_of("fallocate", info.fh, 0x10, 0, 4096) == errno.EOPNOTSUPP  # zero range
    assert fs.errno_of("fallocate", info.fh, FALLOC_FL_PUNCH_HOLE, 0, 4096) == errno.EOPNOTSUPP
    assert fs.errno_of("fallocate", info.fh, 0, 0, 0) == errno.EINVAL
    assert fs.errno_of("fallocate", info.fh, 0, -1, 10) == errno.EINVAL
    assert fs.errno_of("fallocate", info.fh, 0, 1 << 62, 1 << 62) == errno.EFBIG
    fs.write(info.fh, 0, b"x" * 10)
    fs.fallocate(info.fh, 0, 5, 100)  # keeps the data, fills the rest
    assert fs.read(info.fh, 0, 200) == b"x" * 10 + bytes(95)
    fs.fallocate(info.fh, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 2, 3)
    assert fs.read(info.fh, 0, 200) == b"xx" + bytes(3) + b"xxxxx" + bytes(95)
    fs.fallocate(info.fh, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 500, 10)  # past the end
    assert fs.getattr(entry.st_ino, Ctx()).st_size == 105
    fs.release(info.fh)


def test_seek_errnos(fs):
    info, _ = fs.create(ROOT, b"f", 0o644, os.O_RDWR, Ctx())
    assert fs.errno_of("lseek", info.fh, 0, os.SEEK_DATA) == errno.ENXIO  # empty
    fs.write(info.fh, 8192, b"x")
    assert fs.lseek(info.fh, 0, os.SEEK_DATA) == 8192
    assert fs.lseek(info.fh, 0, os.SEEK_HOLE) == 0
    assert fs.lseek(info.fh, 8192, os.SEEK_HOLE) == 8193
    assert fs.errno_of("lseek", info.fh, 8193, os.SEEK_HOLE) == errno.ENXIO
    assert fs.errno_of("lseek", info.fh, 0, os.SEEK_END) == errno.EINVAL
    fs.release(info.fh)


def test_writes_punches_and_truncations_across_blocks_read_back(fs):
    """Random changes of one file, read back whole after each against a plain bytearray (the
    PostgreSQL model keeps data in 64 KiB block rows: ranges that cross them)."""
    rng = random.Random(16)
    info, entry = fs.create(ROOT, b"f", 0o644, os.O_RDWR, Ctx())
    want = bytearray()
    for _ in range(60):
        offset, length = rng.randrange(300_000), rng.randrange(1, 150_000)
        kind = rng.choice(["write", "write", "punch", "truncate", "allocate"])
        if kind == "write":
            data = rng.randbytes(length)
            fs.write(info.fh, offset, data)
            want.extend(bytes(max(0, offset + length - len(want))))
            want[offset : offset + length] = data
        elif kind == "punch":
            fs.fallocate(info.fh, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            end = min(offset + length, len(want))
            if offset < end:
                want[offset:end] = bytes(end - offset)
        elif kind == "allocate":
            fs.fallocate(info.fh, 0, offset, length)
            want.extend(bytes(max(0, offset + length - len(want))))
        else:
            fs.setattr_(entry.st_ino, size=offset)
            del want[offset:]
            want.extend(bytes(offset - len(want)))
        assert fs.getattr(entry.st_ino, Ctx()).st_size == len(want)
        assert fs.read(info.fh, 0, 1 << 20) == want, kind
    fs.release(info.fh)


def test_a_punched_hole_is_replayed_and_checks_clean(store):
    from volfs.store import check, holes

    fs = _open_fs(store)
    info, entry = fs.create(ROOT, b"f", 0o644, os.O_RDWR, Ctx())
    for i in range(8):  # eight extents of 64 KiB
        fs.write(info.fh, i * 65536, bytes([i + 1]) * 65536)
    fs.fallocate(info.fh, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 100_000, 200_000)
    many, _ = fs.create(ROOT, b"many", 0o644, os.O_RDWR, Ctx())
    for i in range(holes.MAX_PUNCH_TAIL + 10):  # past the tail a punch maps again
        fs.write(many.fh, i * 8192, b"m" * 4096)
    fs.fallocate(many.fh, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)
    want = {name: fs.read(h, 0, 1 << 22) for name, h in ((b"f", info.fh), (b"many", many.fh))}
    stored = fs.volume.inodes[entry.st_ino].stored
    assert stored == 8 * 65536 - 200_000
    assert want[b"f"][100_000:300_000] == bytes(200_000)
    assert want[b"many"][:4096] == bytes(4096)
    fs.release(info.fh)
    fs.release(many.fh)
    fs.volume.close(checkpoint=False)  # the next load replays the punch
    again = _open_fs(store)
    try:
        for name, data in want.items():
            handle = again.open(again.ino(name), os.O_RDONLY, Ctx())
            assert again.read(handle.fh, 0, 1 << 22) == data
            again.release(handle.fh)
        assert again.volume.inodes[entry.st_ino].stored == stored
        assert check.check(again.volume) == []
    finally:
        again.volume.close()


# -- extended attributes -------------------------------------------------------------------------


def test_xattr_namespaces(fs):
    f = fs.file(ROOT, b"f")
    fs.setxattr(f, b"user.a", b"1", Ctx())
    assert fs.getxattr(f, b"user.a", Ctx()) == b"1"
    assert fs.errno_of("setxattr", f, b"other.a", b"1", Ctx()) == errno.EOPNOTSUPP
    assert fs.errno_of("setxattr", f, b"user.", b"1", Ctx()) == errno.EINVAL
    assert fs.errno_of("setxattr", f, b"system.posix_acl_access", b"", Ctx()) == errno.EOPNOTSUPP
    assert fs.errno_of("setxattr", f, b"user." + b"n" * 251, b"1", Ctx()) == errno.ERANGE
    assert fs.errno_of("setxattr", f, b"user.big", bytes(65537), Ctx()) == errno.E2BIG
    link = fs.symlink(ROOT, b"l", b"f", Ctx()).st_ino
    assert fs.errno_of("setxattr", link, b"user.a", b"1", Ctx()) == errno.EPERM
    fs.setxattr(link, b"security.x", b"1", Ctx())  # other namespaces may go on symlinks
    assert fs.errno_of("getxattr", f, b"user.nope", Ctx()) == pyfuse3.ENOATTR
    assert fs.errno_of("getxattr", f, b"security.capability", Ctx()) == pyfuse3.ENOATTR
    assert fs.errno_of("removexattr", f, b"user.nope", Ctx()) == pyfuse3.ENOATTR
    fs.removexattr(f, b"user.a", Ctx())
    assert fs.listxattr(f, Ctx()) == []


def test_trusted_xattrs_are_for_root_only(fs):
    f = fs.file(ROOT, b"f")
    assert fs.errno_of("setxattr", f, b"trusted.t", b"1", USER) == errno.EPERM
    fs.setxattr(f, b"trusted.t", b"1", Ctx())
    fs.setxattr(f, b"user.u", b"2", USER)
    assert set(fs.listxattr(f, Ctx())) == {b"trusted.t", b"user.u"}
    assert fs.listxattr(f, USER) == [b"user.u"]
    assert fs.errno_of("getxattr", f, b"trusted.t", USER) == pyfuse3.ENOATTR
    assert fs.errno_of("removexattr", f, b"trusted.t", USER) == errno.EPERM


# -- read-only mounts and limits -----------------------------------------------------------------


def test_read_only_refuses_every_change(store):
    fs = _open_fs(store)
    f = fs.file(ROOT, b"f", b"data")
    fs.volume.close()
    ro = _open_fs(store, read_only=True)
    try:
        assert ro.errno_of("create", ROOT, b"g", 0o644, os.O_WRONLY, Ctx()) == errno.EROFS
        assert ro.errno_of("open", f, os.O_WRONLY, Ctx()) == errno.EROFS
        assert ro.errno_of("open", f, os.O_RDONLY | os.O_TRUNC, Ctx()) == errno.EROFS
        assert ro.errno_of("setattr_", f, Ctx(), mode=0o600) == errno.EROFS
        assert ro.errno_of("unlink", ROOT, b"f", Ctx()) == errno.EROFS
        assert ro.errno_of("rename", ROOT, b"f", ROOT, b"g", 0, Ctx()) == errno.EROFS
        assert ro.errno_of("setxattr", f, b"user.a", b"1", Ctx()) == errno.EROFS
        info = ro.open(f, os.O_RDONLY, Ctx())
        assert ro.read(info.fh, 0, 10) == b"data"
        ro.release(info.fh)
    finally:
        ro.volume.close()


def test_enospc_at_the_inode_limit(fs):
    fs.set_limits(0, 3)  # the root and two more
    a = fs.file(ROOT, b"a")
    fs.dir(ROOT, b"b")
    assert fs.errno_of("create", ROOT, b"c", 0o644, os.O_WRONLY, Ctx()) == errno.ENOSPC
    assert fs.errno_of("mkdir", ROOT, b"c", 0o755, Ctx()) == errno.ENOSPC
    assert fs.statfs(Ctx()).f_ffree == 0
    fs.unlink(ROOT, b"a", Ctx())
    fs.forget([(a, 1)])  # the kernel lets go of it: its inode is free again
    fs.file(ROOT, b"c")


def test_enospc_at_the_size_limit(fs):
    fs.set_limits(1 << 20, 0)
    info, _ = fs.create(ROOT, b"big", 0o644, os.O_WRONLY, Ctx())
    fs.write(info.fh, 0, bytes(512 * 1024))
    assert fs.errno_of("write", info.fh, 512 * 1024, bytes(600 * 1024)) == errno.ENOSPC
    stats = fs.statfs(Ctx())
    assert stats.f_blocks * stats.f_frsize == 1 << 20
    fs.release(info.fh)


# -- store failures at the edge --------------------------------------------------------------------


def test_a_missing_segment_is_eio_with_a_log_line(store, caplog):
    store.create_volume("sized", size=16 << 20)  # 2 MiB segments
    fs = _open_fs(store, name="sized")
    f = fs.file(ROOT, b"f", os.urandom(3 << 20))
    seg = next(iter(fs.volume.inodes[f].extents)).frame.seg
    fs.file(ROOT, b"filler", os.urandom(4 << 20))
    fs.volume.close()  # a checkpoint: the next open reads no segment but the head
    os.unlink(store.volume_path("sized") / segment_name(seg))
    fs = _open_fs(store, name="sized")
    try:
        info = fs.open(f, os.O_RDONLY, ROOT_USER)
        assert fs.errno_of("read", info.fh, 0, 4) == errno.EIO  # not the store's ENOENT
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert any("volume sized:" in e and f"inode {f}" in e for e in errors), errors
        fs.release(info.fh)
    finally:
        fs.volume.close()


def test_a_bug_is_eio_with_its_traceback(fs, caplog):
    assert fs.errno_of("read", 12345, 0, 4) == errno.EIO  # no such handle: a kernel or our bug
    (record,) = [r for r in caplog.records if r.exc_info]
    assert "read of handle 12345 failed" in record.getMessage()
