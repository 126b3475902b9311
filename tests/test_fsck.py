"""volfsd fsck: clean volumes pass, damage is named by path, mounted volumes are refused;
snapshots and clones are checked too, and each line about a snapshot names it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from test_damage import _flip, _pattern
from test_persistence import populate
from test_scrub import store_digest

from volfs.store import headers, history
from volfs.store.root import StoreRoot
from volfs.store.state import ROOT_INO

from conftest import Volume
from helpers import assert_one_line_error, volfsd


def take(volume: Volume, snap: str) -> dict:
    """Snapshot *volume*, unmounted, as *snap* (what ``volfsd snapshot`` does for a volume
    nobody serves)."""
    return history.take_unserved(StoreRoot(volume.root), volume.name, snap)


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


@pytest.mark.store_damaged("a data byte flipped on purpose in a segment a snapshot shares")
def test_fsck_and_scrub_check_each_snapshot_and_name_it(volume, mnt):
    damage_victim(volume, mnt)  # the flipped byte is in a segment...
    take(volume, "before")  # ...that the snapshot names too
    done = volfsd("fsck", volume.name, root=volume.root, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    damaged = "/dir/victim: damaged data in bytes 1048576-1114112 (inode"
    assert any(line.startswith(f"  {damaged}") for line in lines), done.stdout  # the volume's
    assert any(line.startswith(f"  testvol@before: {damaged}") for line in lines), done.stdout
    assert "snapshot testvol@before: 4 inodes," in done.stdout
    assert lines[-1] == "fsck of testvol and its 1 snapshot(s): damage found: in testvol, " \
                        "testvol@before"  # fmt: skip
    alone = volfsd("fsck", "testvol@before", root=volume.root, check=False)
    assert alone.returncode == 1 and f"  testvol@before: {damaged}" in alone.stdout
    assert "volume testvol" not in alone.stdout
    refused = volfsd("fsck", "--repair", "testvol@before", root=volume.root, check=False)
    assert_one_line_error(refused, "never repaired", "clone", rc=2)

    # Gone from the volume, the damaged file stays in the snapshot (and its segment with it).
    mnt = volume.mount()
    os.unlink(mnt / "dir" / "victim")
    done = volfsd("scrub", volume.name, root=volume.root, check=False)  # while mounted
    assert done.returncode == 1, done.stdout + done.stderr
    assert "volume testvol: 3 inodes, 2000 bytes of data verified, 0 problem(s)" in done.stdout
    assert f"  testvol@before: {damaged}" in done.stdout
    assert done.stdout.splitlines()[-1].endswith("damage found: in testvol@before")
    done = volfsd("scrub", "testvol@before", "--rate", "0", root=volume.root, check=False)
    assert done.returncode == 1 and f"  testvol@before: {damaged}" in done.stdout
    volume.unmount()
    done = volfsd("fsck", volume.name, root=volume.root, check=False)
    assert done.returncode == 1 and f"  testvol@before: {damaged}" in done.stdout


@pytest.mark.store_damaged("a snapshot's checkpoint and header damaged on purpose")
def test_fsck_names_a_snapshot_whose_checkpoint_or_header_is_damaged(volume, mnt):
    (mnt / "f").write_bytes(b"x" * 5000)
    volume.unmount()
    take(volume, "cp")
    take(volume, "head")
    snaps = volume.store / "snapshots"
    _flip(snaps / "cp" / "checkpoint", (snaps / "cp" / "checkpoint").stat().st_size // 2)
    (snaps / "head" / "snapshot").write_bytes(b"garbage")
    done = volfsd("fsck", volume.name, root=volume.root, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "volume testvol: 2 inodes, 5000 bytes of data verified, 0 problem(s)" in done.stdout
    assert "  testvol@cp: /f: metadata damaged: checkpoint frame at offset 0" in done.stdout
    assert "note: testvol@cp: the log was not replayed" in done.stdout
    assert "snapshot testvol@head: not loaded, 1 problem(s)" in done.stdout
    assert "  testvol@head: snapshot testvol@head: its header file is damaged" in done.stdout
    assert done.stdout.splitlines()[-1].endswith("in testvol@cp, testvol@head")
    assert volfsd("fsck", "testvol@nope", root=volume.root, check=False).returncode == 2


def _segment_owner(path: Path) -> str:
    """The volume id a segment file's header frame names."""
    with open(path, "rb") as f:
        return headers.one_frame(f.read(4096))[1]


def test_a_clone_is_fsck_clean_before_and_after_it_is_mounted(volume, mnt, copy):
    populate(mnt)
    volume.unmount()
    take(volume, "base")
    store = StoreRoot(volume.root)
    made = history.clone(store, volume.name, "base", "copy")
    origin_id = store.header(volume.name)["id"]
    inherited = sorted(copy.store.glob("seg-*.log"))
    assert inherited and all(_segment_owner(p) == origin_id != made["id"] for p in inherited)
    for verb in ("fsck", "scrub"):  # never mounted: its checkpoint covers a log it lacks
        done = volfsd(verb, "copy", root=volume.root, check=False)
        assert done.returncode == 0 and "0 problem(s)" in done.stdout, done.stdout + done.stderr
    cloned = copy.mount()
    assert (cloned / "a" / "small").read_bytes() == b"small file"
    (cloned / "a" / "small").write_bytes(b"the clone's own")
    (cloned / "new").write_bytes(os.urandom(100_000))
    copy.unmount()
    take(copy, "later")
    history.remove(store, volume.name, "base")  # the clone keeps what it shares
    for name in ("copy", "copy@later", volume.name):
        done = volfsd("fsck", name, root=volume.root, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
    done = volfsd("fsck", "copy", root=volume.root)
    assert done.stdout.splitlines()[-1] == "fsck of copy and its 1 snapshot(s): clean"
    assert (copy.mount() / "a" / "small").read_bytes() == b"the clone's own"
