"""Snapshots, clones and rollback through the CLI and real mounts (issue 13).

Each test drives `volfsd` against a private store and daemon (``host``), reads the files
through the kernel, and leaves the store fsck-clean (tests/audit.py checks it afterwards).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from volfs.store import history, snapshots
from volfs.store.root import StoreRoot

from helpers import wait_until
from snapshot import snapshot as tree_of


def _rows(host, *args: str) -> list[dict]:
    out = host.cli("ls", "--snapshots", "--format", "json", *args).stdout
    return [json.loads(line) for line in out.splitlines()]


def _populate(top: Path) -> None:
    (top / "d").mkdir()
    (top / "d" / "f").write_bytes(b"first version\n")
    (top / "big").write_bytes(os.urandom(3 << 20))
    os.symlink("d/f", top / "link")
    os.link(top / "d" / "f", top / "hard")
    os.setxattr(top / "d" / "f", "user.tag", b"v1")


def test_snapshot_mount_read_only_beside_the_live_volume(host, tmp_path):
    live, old = tmp_path / "live", tmp_path / "old"
    host.cli("mount", "photos", str(live))
    _populate(live)
    before = tree_of(live)
    host.cli("snapshot", "photos@before")
    (live / "d" / "f").write_bytes(b"second version\n")
    (live / "big").unlink()
    (live / "new").write_bytes(b"after the snapshot")
    after = tree_of(live)

    host.cli("mount", "photos@before", str(old))
    assert tree_of(old) == before
    assert tree_of(live) == after
    for attempt in (
        lambda: (old / "x").write_bytes(b"no"),
        lambda: (old / "d" / "f").write_bytes(b"no"),
        lambda: os.unlink(old / "hard"),
        lambda: os.setxattr(old / "d" / "f", "user.tag", b"v2"),
    ):
        with pytest.raises(OSError) as raised:
            attempt()
        assert raised.value.errno == errno.EROFS
    [row] = _rows(host)
    assert row["name"] == "photos@before" and row["snapshot_of"] == "photos"
    assert row["mounts"] == [str(old)] and row["status"] == "mounted"
    # The deleted 3 MiB file is held by the snapshot alone: it shows as the volume's
    # snapshot bytes and as what removing the snapshot gives back (once the worker has
    # written its usage figures, within a second).
    wait_until(lambda: _rows(host)[0]["held"] >= 3 << 20, "the snapshot's held bytes")
    [volume] = json.loads(host.cli("inspect", "photos").stdout)
    assert volume["snapshots"] == 1 and volume["snapshot_bytes"] >= 3 << 20
    [inspected] = json.loads(host.cli("inspect", "photos@before").stdout)
    assert inspected["name"] == "photos@before" and inspected["read_only"] == [str(old)]

    host.refused("rm", "photos@before", words=("mounted", "unmount"))
    host.cli("umount", str(old))
    host.refused("rm", "photos", "-f", words=("snapshot", "-r"))
    host.cli("rm", "photos@before")
    assert _rows(host) == []
    assert tree_of(live) == after
    # rm -r -f of a volume whose snapshot is mounted: both unmounted, both gone.
    host.cli("snapshot", "photos@again")
    host.cli("mount", "photos@again", str(old))
    host.refused("rm", "-r", "photos", words=("mounted", "--force"))
    host.cli("rm", "-r", "-f", "photos")
    assert host.cli("ls", "-q").stdout == "" and _rows(host) == []


def test_snapshot_is_one_instant_while_writers_run(host, tmp_path):
    """Writers append numbered records round-robin over their files: in the snapshot, each
    writer's records are exactly a prefix of what it wrote (no later one without an
    earlier one, in any file)."""
    live, old = tmp_path / "live", tmp_path / "old"
    host.cli("mount", "busy", str(live))
    writer = textwrap.dedent(
        """
        import os, sys
        top, w = sys.argv[1], sys.argv[2]
        fds = [os.open(f"{top}/w{w}-{i}", os.O_WRONLY | os.O_CREAT | os.O_APPEND) for i in range(4)]
        n = 0
        while not os.path.exists(f"{top}/stop"):
            os.write(fds[n % 4], b"%08d\\n" % n)
            n += 1
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(live), str(w)]) for w in range(3)]
    try:
        wait_until(lambda: all((live / f"w{w}-3").exists() for w in range(3)), "writers")
        time.sleep(0.3)
        for i in range(3):
            host.cli("snapshot", f"busy@s{i}")
            time.sleep(0.1)
    finally:
        (live / "stop").write_bytes(b"")
        for proc in procs:
            proc.wait(timeout=60)
    for i in range(3):
        host.cli("mount", f"busy@s{i}", str(old))
        for w in range(3):
            seen = sorted(
                int(line) for f in range(4) for line in (old / f"w{w}-{f}").read_bytes().split()
            )
            assert seen == list(range(len(seen))), f"writer {w} in snapshot s{i} has a gap"
        host.cli("umount", str(old))


def test_clone_is_independent_of_its_origin(host, tmp_path):
    live, copy = tmp_path / "live", tmp_path / "copy"
    host.cli("mount", "prod", str(live), "--size", "64M")
    _populate(live)
    before = tree_of(live)
    host.cli("snapshot", "prod@base")
    host.cli("clone", "prod@base", "test")
    host.refused("clone", "prod@base", "test", words=("exists",))
    host.refused("clone", "prod@nothing", "other", words=("no such snapshot",))
    host.cli("mount", "test", str(copy))
    assert tree_of(copy) == before
    (copy / "d" / "f").write_bytes(b"written in the clone\n")
    (copy / "clone-only").write_bytes(os.urandom(100_000))
    os.unlink(copy / "big")
    assert tree_of(live) == before  # the clone's writes never reach its origin
    [clone] = json.loads(host.cli("inspect", "test").stdout)
    assert clone["origin"] == "prod@base" and clone["size"] == 64 << 20
    # Origin and snapshot go; the clone keeps every byte it uses.
    expected = tree_of(copy)
    host.cli("umount", str(live))
    host.cli("rm", "-r", "prod")
    assert tree_of(copy) == expected
    host.cli("umount", str(copy))
    host.cli("mount", "test", str(copy))
    assert tree_of(copy) == expected


def test_clone_size_and_names_are_checked(host, tmp_path):
    live = tmp_path / "live"
    host.cli("mount", "src", str(live))
    (live / "f").write_bytes(os.urandom(2 << 20))
    host.cli("snapshot", "src@s")
    host.refused("clone", "src@s", "small", "--size", "1M", words=("cannot be smaller",))
    host.refused("clone", "src@s", "Bad/Name", words=("invalid volume name",))
    host.refused("snapshot", "src", words=("VOLUME@SNAPSHOT",))
    host.refused("snapshot", "src@Bad/x", words=("invalid snapshot name",))
    host.refused("snapshot", "src@s", words=("exists",))
    host.refused("snapshot", "none@s", words=("no such volume",))
    host.cli("clone", "src@s", "big", "--size", "10M")
    [big] = json.loads(host.cli("inspect", "big").stdout)
    assert big["size"] == 10 << 20


def test_rollback(host, tmp_path):
    live = tmp_path / "live"
    host.cli("mount", "app", str(live))
    _populate(live)
    first = tree_of(live)
    host.cli("snapshot", "app@one")
    (live / "d" / "f").write_bytes(b"upgraded\n")
    (live / "added").write_bytes(os.urandom(500_000))
    second = tree_of(live)
    host.cli("snapshot", "app@two")
    (live / "broken").write_bytes(b"the upgrade went wrong")
    host.refused("rollback", "app@one", words=("mounted", "unmount"))
    host.cli("umount", str(live))
    host.cli("rollback", "app@one")
    host.cli("mount", "app", str(live))
    assert tree_of(live) == first
    (live / "after-rollback").write_bytes(b"new life")
    host.cli("umount", str(live))
    # A snapshot taken after the one rolled back to stays whole: roll forward to it.
    host.cli("rollback", "app@two")
    host.cli("mount", "app", str(live))
    assert tree_of(live) == second
    assert [r["name"] for r in _rows(host)] == ["app@one", "app@two"]


def test_snapshot_of_an_unmounted_volume_without_a_daemon(host, tmp_path):
    live = tmp_path / "live"
    host.cli("mount", "quiet", str(live))
    _populate(live)
    before = tree_of(live)
    host.cli("umount", "--all")
    host.cleanup()  # no daemon from here on: the CLI works on the store itself
    host.cli("snapshot", "quiet@cold")
    host.cli("clone", "quiet@cold", "quiet2")
    assert [r["name"] for r in _rows(host)] == ["quiet@cold"]
    host.refused("rm", "quiet", words=("snapshot",))
    root = StoreRoot(host.root)
    state, held = history.load(root, "quiet", "cold")
    try:
        assert state.used_by_files > 3 << 20
    finally:
        state.close()
        os.close(held)
    host.cli("rm", "-r", "quiet")
    host.cli("mount", "quiet2", str(live))
    assert tree_of(live) == before


def test_sized_volume_is_not_blocked_by_what_its_snapshots_hold(host, tmp_path):
    """The size (and the log's disk bound) counts live data; data only snapshots hold is
    shown apart, never in the way of new writes."""
    live = tmp_path / "live"
    host.cli("mount", "small", str(live), "--size", "8M")
    for round_ in range(4):
        (live / "data").write_bytes(os.urandom(6 << 20))
        host.cli("snapshot", f"small@r{round_}")
        (live / "data").unlink()
    (live / "data").write_bytes(os.urandom(6 << 20))
    [volume] = json.loads(host.cli("inspect", "small").stdout)
    assert volume["used"] <= 8 << 20
    host.cli("umount", str(live))  # its usage figures written: the held bytes are exact
    [volume] = json.loads(host.cli("inspect", "small").stdout)
    assert volume["snapshot_bytes"] >= 4 * (6 << 20)
    rows = _rows(host)
    assert len(rows) == 4 and all(r["held"] >= 6 << 20 for r in rows)
    host.cli("rm", "small@r0", "small@r1")
    assert [r["name"] for r in _rows(host)] == ["small@r2", "small@r3"]


def test_compaction_and_reclaim_leave_shared_segments_alone(store_root):
    """In-process: what a snapshot shares is never punched or compacted by the volume, and a
    segment the volume let go stays the snapshot's."""
    root = StoreRoot(store_root)
    volume = root.open_volume("v", segment_size=256 * 1024)
    top = volume.inodes[1]
    files = []
    for i in range(20):
        inode = volume.new_inode(0o100644, 0, 0, 0, 1)
        volume.create(top, b"f%d" % i, inode, 1)
        volume.write(inode, 0, os.urandom(100_000), 1)
        files.append(inode)
    snapshots.take(volume, "s")
    for i, inode in enumerate(files):
        volume.unlink(top, b"f%d" % i, inode, 2)
    assert volume.compaction_victim(min_garbage=0) is None  # every sealed segment is shared
    assert volume.reclaim() == 0
    volume.close()
    state, held = history.load(root, "v", "s")
    try:
        names = state.inodes[1].entries
        assert len(names) == 20
        for ino in names.values():
            assert len(state.read(state.inodes[ino], 0, 100_000)) == 100_000
    finally:
        state.close()
        os.close(held)
    history.remove(root, "v", "s")
    volume = root.open_volume("v", create=False)
    try:
        assert volume.reclaim() > 0  # its own again: dead data gives its space back
    finally:
        volume.close()


@pytest.mark.slow
def test_a_thousand_snapshots(host, tmp_path):
    live = tmp_path / "live"
    host.cli("mount", "many", str(live))
    for i in range(1000):
        (live / "counter").write_bytes(b"%d" % i)
        host.cli("snapshot", f"many@s{i:04d}")
    rows = _rows(host)
    assert len(rows) == 1000
    host.cli("mount", "many@s0500", str(tmp_path / "old"))
    assert (tmp_path / "old" / "counter").read_bytes() == b"500"
    host.cli("umount", str(tmp_path / "old"))
    host.cli("umount", str(live))
    host.cli("rm", "-r", "many")


@pytest.mark.expect_log(r"its worker exited \(pid \d+, ")
def test_a_snapshot_mount_is_adopted_and_healed_like_a_volume(host, tmp_path):
    live, old = tmp_path / "live", tmp_path / "old"
    host.cli("mount", "kept", str(live))
    (live / "f").write_bytes(b"then")
    host.cli("snapshot", "kept@s")
    (live / "f").write_bytes(b"now")
    host.cli("mount", "kept@s", str(old))
    worker = host.status()["by_name"]["kept@s"]["worker_pid"]
    os.kill(host.daemon_pid(), signal.SIGKILL)
    assert (old / "f").read_bytes() == b"then"  # the data plane needs no daemon
    host.cli("mount", "kept", str(tmp_path / "again"))  # starts the next daemon
    seen = host.status()["by_name"]["kept@s"]
    assert seen["adopted"] is True and seen["worker_pid"] == worker
    os.kill(worker, signal.SIGKILL)  # healed at its path, read-only as before
    wait_until(lambda: host.status()["by_name"]["kept@s"]["restarts"] == 1, "the heal",
               timeout=60)  # fmt: skip
    wait_until(lambda: (old / "f").read_bytes() == b"then", "the healed snapshot mount",
               ignore=(OSError,))  # fmt: skip
    with pytest.raises(OSError) as raised:
        (old / "g").write_bytes(b"no")
    assert raised.value.errno == errno.EROFS
    host.cli("umount", "--all")


def _at_rest(root: StoreRoot, name: str, snap: str) -> dict | None:
    """`snapshots.take_at_rest` of volume *name*, its lock held meanwhile."""
    fd = root.open_dir(name)
    try:
        lock = root.lock(name, fd)
        try:
            return snapshots.take_at_rest(fd, root.header(name), snap)
        finally:
            os.close(lock)
    finally:
        os.close(fd)


def test_a_volume_at_rest_is_snapshotted_from_its_checkpoint(store_root):
    """A cleanly closed volume is snapshotted without loading it (its checkpoint copied, its
    position moved); one with a log tail after its checkpoint is loaded first."""
    root = StoreRoot(store_root)
    volume = root.open_volume("v", segment_size=256 * 1024)
    top = volume.inodes[1]
    for i in range(30):
        inode = volume.new_inode(0o100644, 0, 0, 0, 1)
        volume.create(top, b"f%d" % i, inode, 1)
        volume.write(inode, 0, b"%d" % i * 20_000, 1)
    volume.close()  # a checkpoint covering the whole log, and the usage figures
    taken = _at_rest(root, "v", "rest")
    assert taken is not None and taken["used"] > 30 * 20_000
    volume = root.open_volume("v", create=False)
    inode = volume.new_inode(0o100644, 0, 0, 0, 1)
    volume.create(volume.inodes[1], b"late", inode, 2)
    volume.close(checkpoint=False)  # as if killed: the log goes on past the checkpoint
    assert _at_rest(root, "v", "tail") is None
    history.take_unserved(root, "v", "tail")
    for snap, names in (("rest", 30), ("tail", 31)):
        state, held = history.load(root, "v", snap)
        try:
            entries = state.inodes[1].entries
            assert len(entries) == names
            assert state.read(state.inodes[entries[b"f7"]], 0, 2) == b"77"
        finally:
            state.close()
            os.close(held)


def test_export_of_a_mounted_volume_is_one_instant(host, tmp_path):
    """`export NAME` of a mounted volume exports a snapshot taken for it, then removes it."""
    live, out = tmp_path / "live", tmp_path / "out"
    host.cli("mount", "web", str(live))
    _populate(live)
    before = tree_of(live, times=False)
    archive = tmp_path / "web.tar"
    host.cli("export", "web", "-o", str(archive))
    assert _rows(host) == []  # the export's snapshot is gone
    out.mkdir()
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf",
                    str(archive), "-C", str(out)], check=True)  # fmt: skip
    assert tree_of(out, times=False) == before
    host.cli("snapshot", "web@keep")
    (live / "d" / "f").write_bytes(b"later\n")
    host.cli("export", "web@keep", "-o", str(tmp_path / "keep.tar"))
    listed = subprocess.run(["tar", "-xOf", str(tmp_path / "keep.tar"), "d/f"],
                            capture_output=True, check=True).stdout  # fmt: skip
    assert listed == b"first version\n"
