"""What writes must keep doing, whatever is tried to spare FUSE requests on them.

The kernel sends getxattr(security.capability) before every write through the page cache;
opening handles with direct_io would spare it, and was tried for write-only handles.  These
tests hold what that must not break: other descriptors and mappings see the new bytes, O_APPEND
appends, a write drops setuid/setgid bits and file capabilities, and a synchronous write
(O_SYNC, O_DSYNC, RWF_SYNC, RWF_DSYNC) is durable when it returns.  The last one failed with
direct_io: the kernel sends no fsync after a direct write, and pyfuse3 does not pass the
WRITE request's flags to `write`.
"""

from __future__ import annotations

import mmap
import os
import shutil
import stat
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

from volfs.store import frame

from helpers import as_nobody, needs_root

PAGE = mmap.PAGESIZE


def test_write_only_write_reaches_cached_pages_and_mappings(mnt: Path):
    path = mnt / "shared"
    path.write_bytes(b"a" * 2 * PAGE)
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 2 * PAGE, mmap.MAP_SHARED) as mapped:
            assert mapped[:PAGE] == b"a" * PAGE  # both pages cached and mapped
            assert os.pread(fd, 2 * PAGE, 0) == b"a" * 2 * PAGE
            writer = os.open(path, os.O_WRONLY)
            try:
                assert os.pwrite(writer, b"b" * PAGE, 0) == PAGE
                assert os.pwrite(writer, b"c" * 10, PAGE + 5) == 10
            finally:
                os.close(writer)
            expected = b"b" * PAGE + b"a" * 5 + b"c" * 10 + b"a" * (PAGE - 15)
            assert mapped[:] == expected
            assert os.pread(fd, 2 * PAGE, 0) == expected
            # And the other way round: a write through the mapping, read by a new descriptor.
            mapped[:3] = b"xyz"
            mapped.flush()
            assert path.read_bytes()[:4] == b"xyzb"
    finally:
        os.close(fd)


def test_write_only_append_and_sizes(mnt: Path):
    path = mnt / "log"
    for piece in (b"one\n", b"two\n", b"three\n"):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, piece)
            assert os.fstat(fd).st_size == path.stat().st_size
        finally:
            os.close(fd)
    assert path.read_bytes() == b"one\ntwo\nthree\n"
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.pwrite(fd, b"Z", 9)  # a hole before it
        assert os.fstat(fd).st_size == 10
    finally:
        os.close(fd)
    assert path.read_bytes() == b"\0" * 9 + b"Z"


@pytest.fixture
def public_mnt(volume):
    """A mount another uid can reach (pytest's tmp dirs are private to root)."""
    outer = Path(tempfile.mkdtemp(prefix="volfs-requests-"))
    outer.chmod(0o755)
    try:
        mnt = volume.mount(outer / "mnt")
        os.chmod(mnt, 0o777)
        yield mnt
    finally:
        volume.cleanup()
        shutil.rmtree(outer, ignore_errors=True)


@needs_root("needs root to act as another uid")
@pytest.mark.parametrize("added_while_open", [False, True])
def test_unprivileged_write_drops_setuid(public_mnt: Path, added_while_open: bool):
    path = public_mnt / "prog"
    path.write_bytes(b"#!/bin/sh\n")
    os.chown(path, 65534, 65534)
    os.chmod(path, 0o755 if added_while_open else 0o6755)
    # The owner may set the bits; a write by a writer without CAP_FSETID drops them, also
    # when they were set after the open.
    code = (
        "import os\n"
        f"p = {str(path)!r}\n"
        "fd = os.open(p, os.O_WRONLY | os.O_APPEND)\n"
        f"if {added_while_open}: os.chmod(p, 0o6755)\n"
        "os.write(fd, b'echo hi\\n')\n"
        "os.close(fd)\n"
    )
    done = as_nobody("/usr/bin/python3", "-c", code)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert path.read_bytes() == b"#!/bin/sh\necho hi\n"


def test_root_write_keeps_setuid(mnt: Path):
    path = mnt / "prog"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_WRONLY)
    try:
        os.chmod(path, 0o4755)
        os.write(fd, b"y")
    finally:
        os.close(fd)
    assert stat.S_IMODE(path.stat().st_mode) == 0o4755  # root has CAP_FSETID


@pytest.mark.skipif(shutil.which("setcap") is None, reason="needs setcap (libcap)")
@pytest.mark.parametrize("added_while_open", [False, True])
def test_write_drops_file_capabilities(mnt: Path, added_while_open: bool):
    path = mnt / "tool"
    path.write_bytes(b"x")

    def setcap() -> None:
        subprocess.run(["setcap", "cap_net_raw+ep", str(path)], check=True, timeout=30)
        assert "security.capability" in os.listxattr(path)

    if not added_while_open:
        setcap()
    fd = os.open(path, os.O_WRONLY)
    try:
        if added_while_open:
            setcap()
        os.write(fd, b"y")
    finally:
        os.close(fd)
    assert "security.capability" not in os.listxattr(path)
    assert path.read_bytes() == b"y"


def _log_end(store: Path) -> tuple[int, int]:
    """Where the last segment's frames end (zeros a sync wrote ahead may follow them)."""
    last = max(store.glob("seg-*.log"))
    content, pos = last.read_bytes(), 0
    while pos < len(content):
        header = content[pos : pos + frame.HEADER.size]
        try:
            meta_len, data_len, _ = frame.decode_header(header)
            frame.decode_meta(header, content[pos + len(header) : pos + len(header) + meta_len])
        except frame.FrameError:
            break
        pos += len(header) + meta_len + data_len
    return int(last.stem.removeprefix("seg-")), pos


def _durable_mark(store: Path) -> tuple[int, int]:
    return struct.unpack("<QQ", (store / "durable").read_bytes()[:16])


@pytest.mark.parametrize("how", ["O_SYNC", "O_DSYNC", "RWF_SYNC", "RWF_DSYNC"])
@pytest.mark.parametrize("access", [os.O_WRONLY, os.O_RDWR])
def test_synchronous_writes_are_durable_when_they_return(volume, mnt: Path, how, access):
    # The kernel turns these into an fsync after the write, whatever the descriptor's mode;
    # a direct_io handle would not (and pyfuse3 does not tell write() about RWF_DSYNC).
    path = mnt / "journal"
    path.write_bytes(b"")
    flags = access | {"O_SYNC": os.O_SYNC, "O_DSYNC": os.O_DSYNC}.get(how, 0)
    fd = os.open(path, flags)
    try:
        for i in range(3):
            if how.startswith("RWF_"):
                os.pwritev(fd, [b"x" * 100], i * 100, getattr(os, how))
            else:
                os.write(fd, b"x" * 100)
            assert _durable_mark(volume.store) == _log_end(volume.store)
    finally:
        os.close(fd)
