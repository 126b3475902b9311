"""Damaged store data is detected: EIO and a log line naming it, never wrong bytes."""

from __future__ import annotations

import errno
import os
import re

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
    # One line names the volume, the file's path, the damaged bytes and where they lie.
    lines = [ln for ln in volume.log_file.read_text().splitlines() if "fails its checksum" in ln]
    found = re.search(r"volume testvol: damaged data in /victim, bytes (\d+)-(\d+) \(inode (\d+);",
                      lines[0])  # fmt: skip
    assert found, lines
    flipped = 4 * MiB + 70 * 1024
    assert int(found[1]) <= flipped < int(found[2]) and int(found[2]) - int(found[1]) <= 64 * 1024
    assert int(found[3]) == os.stat(mnt / "victim").st_ino


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


@pytest.mark.store_damaged("a segment file removed on purpose")
@pytest.mark.expect_log("failed in the store", "missing segment")
def test_missing_segment_gives_eio_and_a_log_line(volume):
    """A segment file gone from the store: reads of the data it held answer EIO with a log
    line naming the volume and inode, never the store's own ENOENT."""
    volfsd("create", volume.name, "--size", "16M", root=volume.root)  # 2 MiB segments
    mnt = volume.mount()
    data = _pattern(3 * MiB)
    (mnt / "victim").write_bytes(data)
    (mnt / "filler").write_bytes(os.urandom(4 * MiB))
    ino = os.stat(mnt / "victim").st_ino
    volume.unmount()  # a checkpoint: the next mount reads no segment but the head

    needle = data[64 * 1024 : 64 * 1024 + 64]
    holding = [s for s in sorted(volume.store.glob("seg-*.log")) if needle in s.read_bytes()]
    assert len(holding) == 1
    holding[0].unlink()
    mnt = volume.mount()  # a new mount: nothing of the victim is in the page cache
    with open(mnt / "victim", "rb") as f, pytest.raises(OSError) as info:
        f.read(MiB)
    assert info.value.errno == errno.EIO
    assert (mnt / "filler").stat().st_size == 4 * MiB  # the mount still serves
    errors = [line for line in volume.log_file.read_text().splitlines() if " ERROR " in line]
    assert any(f"volume {volume.name}: damaged data in /victim, bytes " in e and f"inode {ino}" in e
               for e in errors), errors  # fmt: skip
