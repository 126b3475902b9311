"""volfsd fsck: clean volumes pass, damage is named by path, mounted volumes are refused."""

from __future__ import annotations

from test_damage import _flip, _pattern
from test_persistence import populate

from conftest import volfsd


def test_fsck_clean_volume(volume, mnt):
    populate(mnt)
    volume.unmount()
    done = volfsd("fsck", volume.name, root=volume.root, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 problem(s)" in done.stdout


def test_fsck_refuses_a_mounted_volume(volume, mnt):
    done = volfsd("fsck", volume.name, root=volume.root, check=False)
    assert done.returncode == 2 and "mounted" in done.stderr


def test_fsck_names_damaged_file(volume, mnt):
    data = _pattern(2 << 20)
    (mnt / "dir").mkdir()
    (mnt / "dir" / "victim").write_bytes(data)
    (mnt / "fine").write_bytes(b"ok" * 1000)
    volume.unmount()
    seg = max(volume.store.glob("seg-*.log"))
    _flip(seg, seg.read_bytes().index(data[1 << 20 : (1 << 20) + 64]) + 10)
    done = volfsd("fsck", volume.name, root=volume.root, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "/dir/victim: damaged data in bytes 1048576-2097152" in done.stdout
    assert "/fine" not in done.stdout
    repaired = volfsd("fsck", "--repair", volume.name, root=volume.root, check=False)
    assert repaired.returncode == 1  # damaged data cannot be repaired without guessing


def test_fsck_unreadable_volume(volume, mnt):
    (mnt / "f").write_bytes(b"x")
    volume.unmount()
    checkpoint = volume.store / "checkpoint"
    _flip(checkpoint, checkpoint.stat().st_size // 2)
    done = volfsd("fsck", volume.name, root=volume.root, check=False)
    assert done.returncode == 2 and "damaged" in done.stderr
    assert volfsd("fsck", "ghost", root=volume.root, check=False).returncode == 2
