"""Hostile input: fuzzed decoders, hostile names for the CLI, and abuse inside a volume.

Whatever comes in, the answer is an error of the right kind (a `FrameError`, a
`ProtocolError`, an errno, a one-line CLI error), never a crash or a wrong answer.
"""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from volfs import control
from volfs.store import frame

from helpers import volfsd

FUZZ = settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))


# -- decoders --------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=300))
def test_frame_decoder_on_random_bytes(raw):
    try:
        meta_len, _, _ = frame.decode_header(raw)
        frame.decode_meta(raw[: frame.HEADER.size], raw[frame.HEADER.size :][:meta_len])
    except frame.FrameError:
        pass


@FUZZ
@given(st.binary(min_size=1, max_size=200), st.data())
def test_frame_decoder_on_mutated_frames(meta_bytes, data):
    """Any change to a real frame's header or meta is caught, never decoded as something else."""
    good = b"".join(frame.encode([[6, 1, 0, 4, [1], 2]], b"abcd"))
    pos = data.draw(st.integers(0, len(good) - 5))  # inside header or meta
    flip = data.draw(st.integers(1, 255))
    bad = bytearray(good)
    bad[pos] ^= flip
    with pytest.raises(frame.FrameError):
        meta_len, _, _ = frame.decode_header(bytes(bad))
        frame.decode_meta(bytes(bad[: frame.HEADER.size]), bytes(bad[16 : 16 + meta_len]))


@FUZZ
@given(st.binary(max_size=200))
def test_control_decoder_on_random_bytes(raw):
    try:
        control.frame_length((raw + b"\0\0\0\0")[:4])
        reply = control.decode_body(raw)
        assert isinstance(reply, dict)
    except control.ProtocolError:
        pass


def test_control_frame_length_limit():
    with pytest.raises(control.ProtocolError):
        control.frame_length(struct.pack(">I", control.MAX_FRAME + 1))


# -- the CLI -------------------------------------------------------------------------------------


HOSTILE_NAMES = ["..", ".", "/", "a/../b", "a\nb", "x" * 10_000, "-rf", "A", " a", "a b", "é"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_cli_refuses_hostile_volume_names(store_root, tmp_path, name):
    done = volfsd("create", "--", name, root=store_root, check=False)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert not (store_root / "volumes").exists() or not any((store_root / "volumes").iterdir())


def test_cli_refuses_non_utf8_and_nul(store_root, tmp_path):
    env = {**os.environ, "VOLFS_ROOT": str(store_root), "VOLFS_RUN_DIR": str(tmp_path / "run")}
    for args in (
        [b"create", b"\xff\xfe"],
        [b"mount", b"v", b"/tmp/\xff"],
        [b"mount", b"v", b"rel"],
    ):
        done = subprocess.run([sys.executable, "-m", "volfs", *args], env=env,
                              capture_output=True, timeout=60)  # fmt: skip
        assert done.returncode == 1, done
        assert done.stderr.count(b"\n") == 1 and b"Traceback" not in done.stderr, done.stderr


# -- inside a volume -----------------------------------------------------------------------------


def test_non_utf8_names(mnt):
    names = [b"\xff\xfe", b"caf\xe9", b"\x80" * 255, "snow \u2603".encode()]
    for name in names:
        with open(os.path.join(bytes(mnt), name), "wb") as f:
            f.write(name)
    assert sorted(os.listdir(bytes(mnt))) == sorted(names)
    for name in names:
        with open(os.path.join(bytes(mnt), name), "rb") as f:
            assert f.read() == name


def test_deep_tree(volume, mnt):
    depth = 1000
    fd = os.open(mnt, os.O_RDONLY)
    try:
        for _ in range(depth):  # by directory fd: the path would pass PATH_MAX
            os.mkdir("d", dir_fd=fd)
            new = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = new
        leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(leaf, b"deep")
        os.close(leaf)
    finally:
        os.close(fd)
    new = volume.remount()
    fd = os.open(new, os.O_RDONLY)
    try:
        for _ in range(depth):
            new_fd = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = new_fd
        leaf = os.open("leaf", os.O_RDONLY, dir_fd=fd)
        assert os.read(leaf, 10) == b"deep"
        os.close(leaf)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        os.rename(new / "d", new / "d" / "d" / "inside")  # into its own subtree
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("calls", [20_000, pytest.param(1_000_000, marks=pytest.mark.slow)])
def test_many_xattr_calls(mnt, calls):
    f = mnt / "f"
    f.write_bytes(b"")
    for i in range(calls):
        name = f"user.k{i % 50}"
        os.setxattr(f, name, b"v" * (i % 200))
        if i % 7 == 0:
            os.removexattr(f, name)
    assert len(os.listxattr(f)) <= 50
    with pytest.raises(OSError) as info:
        os.setxattr(f, "user." + "n" * 300, b"x")
    assert info.value.errno == errno.ERANGE
    with pytest.raises(OSError) as info:
        os.setxattr(f, "user.big", b"x" * 70_000)
    assert info.value.errno in (errno.E2BIG, errno.ENOSPC)


def test_offsets_at_the_limit(mnt):
    f = mnt / "huge"
    top = (1 << 63) - 1
    with open(f, "wb") as g:
        g.seek(top - 4096)
        g.write(b"near the end")
    assert os.stat(f).st_size == top - 4096 + len(b"near the end")
    with open(f, "rb") as g:
        g.seek(top - 4096)
        assert g.read(100) == b"near the end"
        g.seek(12345678)
        assert g.read(4096) == bytes(4096)
    fd = os.open(f, os.O_WRONLY)
    try:
        with pytest.raises(OSError) as info:
            os.pwrite(fd, b"x", top)
        assert info.value.errno in (errno.EFBIG, errno.EINVAL)
    finally:
        os.close(fd)
    os.truncate(f, 10)
    assert os.stat(f).st_size == 10
