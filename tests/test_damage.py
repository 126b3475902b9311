"""Damaged store data is detected: EIO and a log line naming it, never wrong bytes."""

from __future__ import annotations

import errno
import os

import pytest

from helpers import volfsd

MiB = 1 << 20


def _pattern(size: int) -> bytes:
    return b"".join(b"%016x" % i for i in range(size // 16))


def _flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.store_damaged("a data byte flipped on purpose")
@pytest.mark.expect_log("fails its checksum")
def test_flipped_data_byte_gives_eio_only_there(volume, mnt):
    data = _pattern(8 * MiB)
    (mnt / "victim").write_bytes(data)
    (mnt / "bystander").write_bytes(b"unharmed " * 1000)
    volume.unmount()

    # Find the victim's bytes at 4 MiB + 70 KiB in the log and flip one of them.
    needle = data[4 * MiB + 70 * 1024 : 4 * MiB + 70 * 1024 + 64]
    hits = []
    for seg in sorted(volume.store.glob("seg-*.log")):
        content = seg.read_bytes()
        if (at := content.find(needle)) >= 0:
            hits.append((seg, at))
    assert len(hits) == 1
    _flip(*hits[0])

    mnt = volume.mount()
    with open(mnt / "victim", "rb") as f:
        assert f.read(MiB) == data[:MiB]
        f.seek(7 * MiB)
        assert f.read() == data[7 * MiB :]
        f.seek(4 * MiB + 64 * 1024)
        with pytest.raises(OSError) as info:
            f.read(4096)
        assert info.value.errno == errno.EIO
    assert (mnt / "bystander").read_bytes() == b"unharmed " * 1000
    # The mount is still alive and writable after the damage was found.
    (mnt / "after").write_bytes(b"still serving")
    assert (mnt / "after").read_bytes() == b"still serving"
    log = volume.log_file.read_text()
    assert "volume testvol: inode" in log and "fails its checksum" in log


@pytest.mark.store_damaged("a checkpoint damaged on purpose")
@pytest.mark.expect_log("checkpoint is damaged")
def test_damaged_checkpoint_refuses_mount_with_one_line(volume, mnt):
    (mnt / "f").write_bytes(b"x")
    volume.unmount()
    checkpoint = volume.store / "checkpoint"
    _flip(checkpoint, checkpoint.stat().st_size // 2)
    done = volfsd("mount", volume.name, str(volume.store.parent.parent / "m2"),
                  root=volume.root, check=False)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "damaged" in done.stderr
    assert "Traceback" not in done.stderr


def test_torn_log_tail_is_cut_and_volume_mounts(volume, mnt):
    (mnt / "kept").write_bytes(b"acknowledged")
    path = volume.crash()  # no checkpoint: the next mount replays the log
    seg = max(volume.store.glob("seg-*.log"))
    with open(seg, "ab") as f:
        f.write(os.urandom(100))  # what a torn, never-acknowledged append leaves
    mnt = volume.mount(path)
    assert (mnt / "kept").read_bytes() == b"acknowledged"
    (mnt / "more").write_bytes(b"appending after the cut works")
    assert (volume.remount() / "more").read_bytes() == b"appending after the cut works"
    assert "torn log tail" in volume.log_file.read_text()
