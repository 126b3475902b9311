"""Each POSIX operation through a real mount, with the errno of each failure."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from helpers import as_nobody, needs_root

libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def renameat2(old, new, flags: int) -> None:
    if libc.renameat2(AT_FDCWD, bytes(old), AT_FDCWD, bytes(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def expect_errno(code: int, func, *args, **kwargs) -> None:
    with pytest.raises(OSError) as info:
        func(*args, **kwargs)
    assert info.value.errno == code, f"expected {errno.errorcode[code]}, got {info.value!r}"


# -- lookup and attributes -------------------------------------------------------------------


def test_lookup_missing(mnt):
    expect_errno(errno.ENOENT, os.stat, mnt / "nope")
    expect_errno(errno.ENOENT, os.stat, mnt / "nope" / "deeper")


def test_not_a_directory(mnt):
    (mnt / "f").write_bytes(b"x")
    expect_errno(errno.ENOTDIR, os.stat, mnt / "f" / "x")
    expect_errno(errno.ENOTDIR, os.listdir, mnt / "f")


def test_name_length(mnt):
    ok = "n" * 255
    (mnt / ok).write_bytes(b"1")
    assert (mnt / ok).read_bytes() == b"1"
    expect_errno(errno.ENAMETOOLONG, open, mnt / ("n" * 256), "wb")
    expect_errno(errno.ENAMETOOLONG, os.mkdir, mnt / ("d" * 256))
    expect_errno(errno.ENAMETOOLONG, os.stat, mnt / ("s" * 256))


def test_new_file_follows_caller(mnt):
    old = os.umask(0o027)
    try:
        fd = os.open(mnt / "f", os.O_CREAT | os.O_WRONLY, 0o666)
        os.close(fd)
        os.mkdir(mnt / "d", 0o777)
    finally:
        os.umask(old)
    st = os.stat(mnt / "f")
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert stat.S_IMODE(os.stat(mnt / "d").st_mode) == 0o750
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())


def test_setgid_directory(mnt):
    os.mkdir(mnt / "shared")
    os.chown(mnt / "shared", 0, 1234)
    os.chmod(mnt / "shared", 0o2775)
    (mnt / "shared" / "f").write_bytes(b"")
    os.mkdir(mnt / "shared" / "sub")
    assert os.stat(mnt / "shared" / "f").st_gid == 1234
    sub = os.stat(mnt / "shared" / "sub")
    assert sub.st_gid == 1234 and sub.st_mode & stat.S_ISGID


def test_chmod_chown(mnt):
    f = mnt / "f"
    f.write_bytes(b"")
    os.chmod(f, 0o4751)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o4751
    os.chown(f, 1000, 2000)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (1000, 2000)


def test_utimens_nanoseconds(volume, mnt):
    f = mnt / "f"
    f.write_bytes(b"")
    os.utime(f, ns=(1_234_567_891_123_456_789, 1_500_000_000_987_654_321))
    st = os.stat(f)
    assert st.st_atime_ns == 1_234_567_891_123_456_789
    assert st.st_mtime_ns == 1_500_000_000_987_654_321
    st = os.stat(volume.remount() / "f")
    assert st.st_mtime_ns == 1_500_000_000_987_654_321


def test_write_updates_times(mnt):
    f = mnt / "f"
    f.write_bytes(b"a")
    os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    with open(f, "ab") as out:
        out.write(b"b")
    assert os.stat(f).st_mtime_ns > 1_000_000_000


def test_truncate_up_and_down(mnt):
    f = mnt / "f"
    f.write_bytes(b"0123456789")
    os.truncate(f, 4)
    assert f.read_bytes() == b"0123"
    os.truncate(f, 8)
    assert f.read_bytes() == b"0123\0\0\0\0"
    with open(f, "r+b") as g:
        g.truncate(2)
        g.seek(0)
        assert g.read() == b"01"
    expect_errno(errno.EISDIR, os.truncate, mnt, 0)


def test_open_trunc(mnt):
    f = mnt / "f"
    f.write_bytes(b"long content")
    f.write_bytes(b"short")
    assert f.read_bytes() == b"short"


# -- special files ----------------------------------------------------------------------------


def test_mknod_fifo_socket_device(mnt):
    os.mkfifo(mnt / "fifo", 0o600)
    assert stat.S_ISFIFO(os.stat(mnt / "fifo").st_mode)
    os.mknod(mnt / "reg", 0o644 | stat.S_IFREG)
    assert stat.S_ISREG(os.stat(mnt / "reg").st_mode)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(mnt / "sock"))
    assert stat.S_ISSOCK(os.stat(mnt / "sock").st_mode)
    if os.geteuid() == 0:
        os.mknod(mnt / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        st = os.stat(mnt / "null")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    expect_errno(errno.EEXIST, os.mkfifo, mnt / "fifo")


def test_fifo_works(mnt):
    os.mkfifo(mnt / "fifo")
    reader = subprocess.Popen(["cat", str(mnt / "fifo")], stdout=subprocess.PIPE)
    try:
        with open(mnt / "fifo", "wb") as w:
            w.write(b"through the pipe")
        assert reader.communicate(timeout=10)[0] == b"through the pipe"
    finally:
        reader.kill()
        reader.wait()


# -- directories ------------------------------------------------------------------------------


def test_mkdir_rmdir(mnt):
    os.mkdir(mnt / "d")
    expect_errno(errno.EEXIST, os.mkdir, mnt / "d")
    (mnt / "d" / "f").write_bytes(b"")
    expect_errno(errno.ENOTEMPTY, os.rmdir, mnt / "d")
    expect_errno(errno.ENOTDIR, os.rmdir, mnt / "d" / "f")
    os.unlink(mnt / "d" / "f")
    os.rmdir(mnt / "d")
    expect_errno(errno.ENOENT, os.rmdir, mnt / "d")


def test_directory_nlink(mnt):
    os.mkdir(mnt / "d")
    assert os.stat(mnt / "d").st_nlink == 2
    os.mkdir(mnt / "d" / "a")
    os.mkdir(mnt / "d" / "b")
    assert os.stat(mnt / "d").st_nlink == 4
    os.rename(mnt / "d" / "b", mnt / "b")
    assert os.stat(mnt / "d").st_nlink == 3
    os.rmdir(mnt / "d" / "a")
    assert os.stat(mnt / "d").st_nlink == 2


def test_dot_entries(mnt):
    os.makedirs(mnt / "d" / "sub")
    listing = subprocess.run(["ls", "-a", "-i", str(mnt / "d")], capture_output=True,
                             text=True, check=True).stdout.split()  # fmt: skip
    entries = dict(zip(listing[1::2], map(int, listing[0::2]), strict=True))
    assert set(entries) == {".", "..", "sub"}
    assert entries["."] == os.stat(mnt / "d").st_ino
    assert entries[".."] == os.stat(mnt).st_ino
    assert sorted(os.listdir(mnt / "d")) == ["sub"]


def test_unlink(mnt):
    (mnt / "f").write_bytes(b"")
    os.mkdir(mnt / "d")
    expect_errno(errno.EISDIR, os.unlink, mnt / "d")
    os.unlink(mnt / "f")
    expect_errno(errno.ENOENT, os.unlink, mnt / "f")


@pytest.mark.parametrize("count", [20_000, pytest.param(100_000, marks=pytest.mark.slow)])
def test_big_directory_listing(mnt, count):
    d = mnt / "big"
    d.mkdir()
    names = {f"entry-{i:06d}" for i in range(count)}
    for name in names:
        os.close(os.open(d / name, os.O_CREAT | os.O_WRONLY))
    assert set(os.listdir(d)) == names


def test_readdir_stable_while_changing(mnt):
    """Entries present throughout a listing appear exactly once, whatever else changes."""
    d = mnt / "d"
    d.mkdir()
    stable = {f"s{i:05d}" for i in range(3000)}
    for name in stable:
        os.close(os.open(d / name, os.O_CREAT | os.O_WRONLY))
    seen = []
    churn = 0
    with os.scandir(d) as it:
        for n, entry in enumerate(it):
            seen.append(entry.name)
            if n % 10 == 0:
                os.close(os.open(d / f"new{churn}", os.O_CREAT | os.O_WRONLY))
                victim = d / f"new{churn - 1}"
                if victim.exists():
                    victim.unlink()
                churn += 1
                # Names that stay throughout, while what they name changes.
                i = n % 1500
                renameat2(d / f"s{i:05d}", d / f"s{2999 - i:05d}", RENAME_EXCHANGE)
                os.close(os.open(d / "over", os.O_CREAT | os.O_WRONLY))
                os.rename(d / "over", d / f"s{(n * 7) % 3000:05d}")
    stable_seen = [name for name in seen if name in stable]
    assert len(stable_seen) == len(set(stable_seen)) == len(stable)


# -- links ------------------------------------------------------------------------------------


def test_symlink_readlink(mnt):
    os.symlink("target/../x", mnt / "l")
    assert os.readlink(mnt / "l") == "target/../x"
    assert os.lstat(mnt / "l").st_size == len("target/../x")
    expect_errno(errno.EINVAL, os.readlink, mnt)
    expect_errno(errno.EEXIST, os.symlink, "y", mnt / "l")
    (mnt / "real").write_bytes(b"through")
    os.symlink("real", mnt / "l2")
    assert (mnt / "l2").read_bytes() == b"through"


def test_hard_links(mnt):
    (mnt / "a").write_bytes(b"shared")
    os.link(mnt / "a", mnt / "b")
    assert os.stat(mnt / "a").st_nlink == 2
    assert os.stat(mnt / "a").st_ino == os.stat(mnt / "b").st_ino
    with open(mnt / "b", "ab") as f:
        f.write(b"!")
    assert (mnt / "a").read_bytes() == b"shared!"
    os.unlink(mnt / "a")
    assert os.stat(mnt / "b").st_nlink == 1
    os.mkdir(mnt / "d")
    expect_errno(errno.EPERM, os.link, mnt / "d", mnt / "d2")
    expect_errno(errno.EEXIST, os.link, mnt / "b", mnt / "d")


# -- rename -----------------------------------------------------------------------------------


def test_rename_over_file(mnt):
    (mnt / "a").write_bytes(b"A")
    (mnt / "b").write_bytes(b"B")
    os.rename(mnt / "a", mnt / "b")
    assert not (mnt / "a").exists()
    assert (mnt / "b").read_bytes() == b"A"


def test_rename_across_directories_and_over_dirs(mnt):
    for d in ("d1", "d2", "empty", "full"):
        os.mkdir(mnt / d)
    (mnt / "full" / "x").write_bytes(b"")
    (mnt / "d1" / "f").write_bytes(b"F")
    os.rename(mnt / "d1" / "f", mnt / "d2" / "g")
    assert (mnt / "d2" / "g").read_bytes() == b"F"
    os.rename(mnt / "d1", mnt / "empty")
    assert not (mnt / "d1").exists()
    expect_errno(errno.ENOTEMPTY, os.rename, mnt / "d2", mnt / "full")
    expect_errno(errno.EINVAL, os.rename, mnt / "d2", mnt / "d2" / "g")
    (mnt / "file").write_bytes(b"")
    expect_errno(errno.ENOTDIR, os.rename, mnt / "d2", mnt / "file")
    expect_errno(errno.EISDIR, os.rename, mnt / "d2" / "g", mnt / "full")
    expect_errno(errno.EINVAL, os.rename, mnt / "d2", mnt / "d2" / "sub")
    expect_errno(errno.ENOENT, os.rename, mnt / "missing", mnt / "x")


def test_rename_same_inode_is_noop(mnt):
    (mnt / "a").write_bytes(b"A")
    os.link(mnt / "a", mnt / "b")
    os.rename(mnt / "a", mnt / "b")
    assert (mnt / "a").exists() and (mnt / "b").exists()


def test_rename_noreplace(mnt):
    (mnt / "a").write_bytes(b"A")
    (mnt / "b").write_bytes(b"B")
    expect_errno(errno.EEXIST, renameat2, mnt / "a", mnt / "b", RENAME_NOREPLACE)
    renameat2(mnt / "a", mnt / "c", RENAME_NOREPLACE)
    assert (mnt / "c").read_bytes() == b"A"


def test_rename_exchange(volume, mnt):
    (mnt / "f").write_bytes(b"file")
    os.mkdir(mnt / "d")
    (mnt / "d" / "inside").write_bytes(b"")
    renameat2(mnt / "f", mnt / "d", RENAME_EXCHANGE)
    assert (mnt / "d").read_bytes() == b"file"
    assert os.listdir(mnt / "f") == ["inside"]
    expect_errno(errno.ENOENT, renameat2, mnt / "f", mnt / "nope", RENAME_EXCHANGE)
    new = volume.remount()
    assert (new / "d").read_bytes() == b"file"
    assert os.listdir(new / "f") == ["inside"]


# -- file data ---------------------------------------------------------------------------------


def test_overwrite_in_middle(mnt):
    f = mnt / "f"
    f.write_bytes(b"a" * 300_000)
    with open(f, "r+b") as g:
        g.seek(100_000)
        g.write(b"b" * 70_000)
    assert f.read_bytes() == b"a" * 100_000 + b"b" * 70_000 + b"a" * 130_000


def test_o_append(mnt):
    f = mnt / "f"
    f.write_bytes(b"start")
    fds = [os.open(f, os.O_WRONLY | os.O_APPEND) for _ in range(2)]
    try:
        for i in range(10):
            os.write(fds[i % 2], b"%d" % i)
    finally:
        for fd in fds:
            os.close(fd)
    assert f.read_bytes() == b"start0123456789"


def test_o_append_cleared_by_fcntl(mnt):
    f = mnt / "f"
    f.write_bytes(b"12345")
    fd = os.open(f, os.O_RDWR | os.O_APPEND)
    try:
        os.pwrite(fd, b"a", 0)  # Linux appends, whatever the offset
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_APPEND)
        os.pwrite(fd, b"Y", 0)  # no longer appending: the offset counts
    finally:
        os.close(fd)
    assert f.read_bytes() == b"Y2345a"


def test_sparse_file(volume, mnt):
    f = mnt / "sparse"
    with open(f, "wb") as g:
        g.seek(1 << 30)
        g.write(b"end")
    st = os.stat(f)
    assert st.st_size == (1 << 30) + 3
    assert st.st_blocks * 512 < 1 << 20
    with open(f, "rb") as g:
        g.seek((1 << 30) - 5)
        assert g.read() == b"\0" * 5 + b"end"
        g.seek(12345)
        assert g.read(4096) == b"\0" * 4096
    store_bytes = sum(p.stat().st_blocks * 512 for p in volume.store.glob("seg-*"))
    assert store_bytes < 8 << 20


def test_file_beyond_4gib(mnt):
    f = mnt / "big"
    with open(f, "wb") as g:
        g.seek(5 << 30)
        g.write(b"past 4 GiB")
    with open(f, "rb") as g:
        g.seek(5 << 30)
        assert g.read() == b"past 4 GiB"
    assert os.stat(f).st_size == (5 << 30) + 10


def test_large_sequential_roundtrip(volume, mnt):
    data = os.urandom(3 << 20) * 4
    (mnt / "f").write_bytes(data)
    assert (mnt / "f").read_bytes() == data
    assert (volume.remount() / "f").read_bytes() == data


def test_open_unlinked_file_stays_readable(mnt):
    f = mnt / "f"
    f.write_bytes(b"still here")
    with open(f, "rb") as g:
        os.unlink(f)
        assert g.read() == b"still here"
        assert os.fstat(g.fileno()).st_nlink == 0


def test_fsync_and_fdatasync(mnt):
    fd = os.open(mnt / "f", os.O_CREAT | os.O_WRONLY)
    try:
        os.write(fd, b"durable")
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    dfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def test_statfs(mnt):
    st = os.statvfs(mnt)
    assert st.f_namemax == 255
    assert st.f_blocks > 0 and st.f_bsize > 0


# -- extended attributes ------------------------------------------------------------------------


def test_xattrs(volume, mnt):
    f = mnt / "f"
    f.write_bytes(b"")
    expect_errno(errno.ENODATA, os.getxattr, f, "user.missing")
    os.setxattr(f, "user.a", b"1")
    os.setxattr(f, "user.b", b"\0binary\xff")
    assert os.getxattr(f, "user.b") == b"\0binary\xff"
    assert sorted(os.listxattr(f)) == ["user.a", "user.b"]
    expect_errno(errno.EEXIST, os.setxattr, f, "user.a", b"2", os.XATTR_CREATE)
    expect_errno(errno.ENODATA, os.setxattr, f, "user.c", b"2", os.XATTR_REPLACE)
    os.setxattr(f, "user.a", b"2", os.XATTR_REPLACE)
    os.removexattr(f, "user.b")
    expect_errno(errno.ENODATA, os.removexattr, f, "user.b")
    new = volume.remount()
    assert os.listxattr(new / "f") == ["user.a"]
    assert os.getxattr(new / "f", "user.a") == b"2"


def test_xattr_limits(mnt):
    f = mnt / "f"
    f.write_bytes(b"")
    os.setxattr(f, "user.big", b"v" * 65536)
    expect_errno(errno.E2BIG, os.setxattr, f, "user.huge", b"v" * 65537)
    expect_errno(errno.ERANGE, os.setxattr, f, "user." + "n" * 251, b"")


def test_xattr_on_directory_and_symlink(mnt):
    os.mkdir(mnt / "d")
    os.setxattr(mnt / "d", "user.tag", b"dir")
    assert os.getxattr(mnt / "d", "user.tag") == b"dir"
    os.symlink("d", mnt / "l")
    expect_errno(errno.EPERM, os.setxattr, mnt / "l", "user.x", b"", follow_symlinks=False)


# -- permissions through default_permissions ----------------------------------------------------


@needs_root("needs root to act as another uid")
def test_other_uid_gets_kernel_permission_checks(volume):
    # pytest's tmp dirs are private to root: mount where another uid can reach
    outer = Path(tempfile.mkdtemp(prefix="volfs-perm-"))
    outer.chmod(0o755)
    try:
        mnt = volume.mount(outer / "mnt")
        _check_other_uid(mnt)
    finally:
        volume.cleanup()
        shutil.rmtree(outer, ignore_errors=True)


def _check_other_uid(mnt: Path) -> None:
    os.chmod(mnt, 0o755)
    os.mkdir(mnt / "open")
    os.chmod(mnt / "open", 0o777)
    (mnt / "private").write_bytes(b"secret")
    os.chmod(mnt / "private", 0o600)

    python = ("/usr/bin/python3", "-c")  # not the venv's: uid 65534 may not reach it
    done = as_nobody(*python, f"open({str(mnt / 'open' / 'mine')!r}, 'w').write('x')")
    assert done.returncode == 0, done.stderr
    st = os.stat(mnt / "open" / "mine")
    assert (st.st_uid, st.st_gid) == (65534, 65534)
    done = as_nobody(*python, f"open({str(mnt / 'private')!r}).read()")
    assert "PermissionError" in done.stderr
    done = as_nobody(*python, f"open({str(mnt / 'denied')!r}, 'w')")
    assert "PermissionError" in done.stderr
