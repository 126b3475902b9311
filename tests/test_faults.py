"""Faults under the store: a full disk.

The store lives on a small tmpfs here, so the disk fills up for real: writers get ENOSPC, the
volume stays consistent and keeps serving what it holds, and deleting files in the volume makes
room again (the store punches the dead data out of its log instead of waiting for compaction).
"""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from conftest import volfsd

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
DISK = 48 << 20


@pytest.fixture
def small_disk(store_root):
    """The store root on a tmpfs of DISK bytes (request it before `volume`)."""
    store_root.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(store_root)],
                   check=True)  # fmt: skip
    try:
        yield store_root
    finally:
        subprocess.run(["umount", "-l", str(store_root)], check=False)


def _fill(path, piece: int = 1 << 20) -> int:
    """Write to *path* until the disk is full; return the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as f, pytest.raises(OSError) as info:
        while True:
            written += f.write(os.urandom(piece))
    assert info.value.errno == errno.ENOSPC
    return written


def _free(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@ROOT_ONLY
def test_full_disk_gives_enospc_and_room_comes_back(small_disk, volume):
    mnt = volume.mount()
    keep = {f"keep{i}": os.urandom(100_000 + i) for i in range(5)}
    for name, data in keep.items():
        (mnt / name).write_bytes(data)
    written = _fill(mnt / "big")
    assert written > DISK // 2
    # Full: what is stored still reads back, small metadata changes may or may not fit.
    assert all((mnt / n).read_bytes() == d for n, d in keep.items())
    assert _fill(mnt / "more") < 2 << 20  # full it stays: nothing dead to free yet
    os.unlink(mnt / "more")
    os.unlink(mnt / "big")
    after = os.urandom(4 << 20)  # the first write that finds the disk full frees the dead data
    (mnt / "after").write_bytes(after)
    assert _free(small_disk) > DISK // 3
    assert "gave" in volume.log_file.read_text()
    new = volume.remount()
    assert all((new / n).read_bytes() == d for n, d in keep.items())
    assert (new / "after").read_bytes() == after
    assert sorted(os.listdir(new)) == ["after", *sorted(keep)]
    volume.unmount()
    done = volfsd("fsck", volume.name, root=volume.root, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@ROOT_ONLY
def test_full_disk_across_a_remount(small_disk, volume):
    """Unmounting with the disk full loses nothing (the checkpoint may not fit), and the
    volume mounts again and frees the space of what was deleted."""
    mnt = volume.mount()
    (mnt / "keep").write_bytes(b"k" * 300_000)
    _fill(mnt / "big", piece=64 << 10)
    new = volume.remount()
    assert (new / "keep").read_bytes() == b"k" * 300_000
    os.unlink(new / "big")
    (new / "after").write_bytes(b"a" * (2 << 20))
    assert _free(small_disk) > DISK // 3
    new = volume.remount()
    assert (new / "after").read_bytes() == b"a" * (2 << 20)
    assert not (new / "big").exists()
