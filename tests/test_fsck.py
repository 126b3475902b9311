"""volfsd fsck: clean volumes pass, damage is named by path, mounted volumes are refused."""

from __future__ import annotations

import os
import stat

import pytest
from test_damage import _flip, _pattern
from test_persistence import populate
from test_scrub import store_digest

from volfs.store.root import StoreRoot
from volfs.store.state import ROOT_INO

from helpers import volfsd


def test_fsck_clean_volume(volume, mnt):
    populate(mnt)
    volume.unmount()
    done = volfsd("fsck", volume.name, root=volume.root, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 problem(s)" in done.stdout


def test_fsck_refuses_a_mounted_volume(volume, mnt):
    done = volfsd("fsck", volume.name, root=volume.root, check=False)
    assert done.returncode == 2 and "mounted" in done.stderr and done.stderr.count("\n") == 1


def damage_victim(volume, mnt) -> None:
    """Files /dir/victim (2 MiB, a byte of its second MiB flipped in the store) and /fine; the
    volume left unmounted."""
    data = _pattern(2 << 20)
    (mnt / "dir").mkdir()
    (mnt / "dir" / "victim").write_bytes(data)
    (mnt / "fine").write_bytes(b"ok" * 1000)
    volume.unmount()
    seg = max(volume.store.glob("seg-*.log"))
    _flip(seg, seg.read_bytes().index(data[1 << 20 : (1 << 20) + 64]) + 10)


@pytest.mark.store_damaged("a data byte flipped on purpose")
def test_fsck_names_damaged_file(volume, mnt):
    damage_victim(volume, mnt)
    done = volfsd("fsck", volume.name, root=volume.root, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "/dir/victim: damaged data in bytes 1048576-1114112 (inode" in done.stdout
    assert "/fine" not in done.stdout
    repaired = volfsd("fsck", "--repair", volume.name, root=volume.root, check=False)
    assert repaired.returncode == 1  # damaged data cannot be repaired without guessing
    assert "nothing to repair" in repaired.stdout


@pytest.mark.store_damaged("a checkpoint damaged on purpose")
def test_fsck_damaged_checkpoint(volume, mnt):
    (mnt / "f").write_bytes(b"x")
    volume.unmount()
    checkpoint = volume.store / "checkpoint"
    _flip(checkpoint, checkpoint.stat().st_size // 2)
    done = volfsd("fsck", volume.name, root=volume.root, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "checkpoint frame at offset 0 fails its checks" in done.stdout
    ghost = volfsd("fsck", "ghost", root=volume.root, check=False)
    assert ghost.returncode == 2 and "no such volume" in ghost.stderr


def test_fsck_changes_nothing_but_the_lock(volume, mnt):
    (mnt / "kept").write_bytes(b"acknowledged")
    path = volume.crash()
    seg = max(volume.store.glob("seg-*.log"))
    with open(seg, "ab") as f:
        f.write(os.urandom(100))  # a torn tail: fsck notes it, the next mount cuts it
    before = store_digest(volume.store)
    done = volfsd("fsck", volume.name, root=volume.root, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "was not checked" in done.stdout
    after = store_digest(volume.store)
    assert {k: v for k, v in after.items() if k != "lock"} == {
        k: v for k, v in before.items() if k != "lock"
    }
    assert (volume.mount(path) / "kept").read_bytes() == b"acknowledged"


def test_fsck_repairs_an_orphan(store_root):
    """A directory removed with a file still in it (only damage or a bug can do that) leaves
    the file unreachable: --repair links it into /lost+found."""
    volume = StoreRoot(store_root).open_volume("orph")
    top = volume.inodes[ROOT_INO]
    folder = volume.new_inode(stat.S_IFDIR | 0o755, 0, 0, 0, 1)
    volume.create(top, b"folder", folder, 1)
    inner = volume.new_inode(stat.S_IFREG | 0o644, 0, 0, 0, 1)
    volume.create(volume.inodes[folder.ino], b"inner", inner, 1)
    volume.write(volume.inodes[inner.ino], 0, b"still here", 2)
    volume.unlink(top, b"folder", volume.inodes[folder.ino], 3)
    volume.close(checkpoint=False)  # replayed, the log leaves "inner" linked from nowhere
    done = volfsd("fsck", "orph", root=store_root, check=False)
    assert done.returncode == 1
    assert f"inode {inner.ino}: not reachable from the root (orphan)" in done.stdout
    done = volfsd("fsck", "--repair", "orph", root=store_root, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"repaired: inode {inner.ino} linked as /lost+found/#{inner.ino}" in done.stdout
    assert done.stdout.rstrip().endswith("0 problem(s)")
    volume = StoreRoot(store_root).open_volume("orph")
    try:
        lost = volume.inodes[volume.inodes[ROOT_INO].entries.get(b"lost+found")]
        found = volume.inodes[lost.entries.get(b"#%d" % inner.ino)]
        assert volume.read(found, 0, 100) == b"still here"
    finally:
        volume.close()
