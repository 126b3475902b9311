"""Checkpoints written by a forked child while the server goes on changing the volume."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap
from functools import partial

import pytest
import trio

from volfs import worker
from volfs.store import journal, pidlock
from volfs.store.root import StoreRoot
from volfs.store.state import ROOT_INO
from volfs.store.volume import Volume

from helpers import wait_gone

SEGMENT = 64 * 1024


def _create(volume: Volume, name: bytes, data: bytes) -> int:
    inode = volume.new_inode(stat.S_IFREG | 0o644, 0, 0, 0, 1)
    volume.create(volume.inodes[ROOT_INO], name, inode, 1)
    volume.write(volume.inodes[inode.ino], 0, data, 2)
    return inode.ino


def _contents(volume: Volume) -> dict[bytes, bytes]:
    files = {}
    for name, ino in volume.inodes[ROOT_INO].entries.items():
        inode = volume.inodes[ino]
        files[name] = volume.read(inode, 0, inode.size)
    return files


def _ino(volume: Volume, name: bytes) -> int:
    return volume.inodes[ROOT_INO].entries[name]


def _segment_of(volume: Volume, name: bytes) -> int:
    inode = volume.inodes[volume.inodes[ROOT_INO].entries[name]]
    return next(iter(inode.extents)).frame.seg


def test_changes_made_while_the_writer_runs_are_kept(tmp_path):
    root = StoreRoot(tmp_path / "store")
    volume = root.open_volume("v", segment_size=SEGMENT)
    for i in range(40):
        _create(volume, b"old%d" % i, os.urandom(20_000))
    # A segment that is dead before the fork may go; one that dies after it must stay, since
    # the checkpoint still points into it.
    dead_before = _segment_of(volume, b"old0")
    for name in (b"old0", b"old1", b"old2", b"old3"):
        volume.unlink(volume.inodes[ROOT_INO], name, volume.inodes[_ino(volume, name)], 3)
    assert volume.live.get(dead_before, 0) == 0
    dies_after = _segment_of(volume, b"old20")
    victims = [n for n in _contents(volume) if _segment_of(volume, n) == dies_after]
    checkpoint_before = volume.checkpoint_at

    pid = volume.fork_checkpoint()
    assert volume.checkpoints.running
    for name in victims:
        volume.unlink(volume.inodes[ROOT_INO], name, volume.inodes[_ino(volume, name)], 4)
    for i in range(10):
        _create(volume, b"new%d" % i, os.urandom(30_000))
    assert volume.live.get(dies_after, 0) == 0
    _, status = os.waitpid(pid, 0)
    assert volume.checkpoints.end(status)

    assert volume.checkpoint_at > checkpoint_before
    assert dead_before not in volume.log.segments
    assert dies_after in volume.log.segments
    expected = _contents(volume)
    volume.close(checkpoint=False)  # as if killed: the next load replays after the checkpoint
    again = root.open_volume("v")
    assert _contents(again) == expected
    again.close()


def test_a_failed_writer_changes_nothing(tmp_path, monkeypatch):
    root = StoreRoot(tmp_path / "store")
    volume = root.open_volume("v", segment_size=SEGMENT)
    for i in range(20):
        _create(volume, b"f%d" % i, os.urandom(10_000))
    volume.checkpoint()
    before = (volume.checkpoint_at, list(volume.log.segments))
    checkpoint_file = tmp_path / "store" / "volumes" / "v" / journal.CHECKPOINT_FILE
    old_checkpoint = checkpoint_file.read_bytes()
    _create(volume, b"late", b"x" * 1000)

    def fail(dir_fd, records):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal, "write_checkpoint", fail)  # inherited by the child
    pid = volume.fork_checkpoint()
    _, status = os.waitpid(pid, 0)
    assert not volume.checkpoints.end(status)
    assert (volume.checkpoint_at, list(volume.log.segments)) == before
    assert checkpoint_file.read_bytes() == old_checkpoint
    expected = _contents(volume)
    monkeypatch.undo()
    volume.close(checkpoint=False)
    again = root.open_volume("v")
    assert _contents(again) == expected
    again.close()


def test_the_writer_dies_with_the_server(tmp_path):
    """A killed server's checkpoint writer goes too, so no later server meets it writing."""
    store = tmp_path / "store"
    volume = StoreRoot(store).open_volume("v")
    for i in range(30_000):  # enough that writing a checkpoint takes a while
        inode = volume.new_inode(stat.S_IFREG | 0o644, 0, 0, 0, 1)
        volume.create(volume.inodes[ROOT_INO], b"f%d" % i, inode, 1)
    volume.close()
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from volfs.store.root import StoreRoot
                volume = StoreRoot({str(store)!r}).open_volume("v")
                print(volume.fork_checkpoint(), flush=True)
                time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        writer = int(server.stdout.readline())
        os.kill(server.pid, signal.SIGKILL)
        server.wait(10)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert wait_gone(writer, 10)
    assert not pidlock.is_held(store / "volumes" / "v" / "lock")
    again = StoreRoot(store).open_volume("v")
    assert len(again.inodes[ROOT_INO].entries) == 30_000
    again.close()


def _volume_with_garbage(tmp_path) -> Volume:
    volume = StoreRoot(tmp_path / "store").open_volume("v", segment_size=SEGMENT)
    for i in range(40):
        _create(volume, b"f%d" % i, os.urandom(10_000))
    for i in range(0, 40, 2):
        name = b"f%d" % i
        volume.unlink(volume.inodes[ROOT_INO], name, volume.inodes[_ino(volume, name)], 3)
    return volume


def test_a_failing_writer_stops_compaction_instead_of_forking_again(tmp_path, monkeypatch):
    volume = _volume_with_garbage(tmp_path)
    forks = []
    real_fork = volume.fork_checkpoint

    def counting_fork():
        if len(forks) > 3:
            raise AssertionError("compaction forks writer after writer")
        forks.append(real_fork())
        return forks[-1]

    def fail(dir_fd, records):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal, "write_checkpoint", fail)
    monkeypatch.setattr(volume, "fork_checkpoint", counting_fork)
    monkeypatch.setattr(volume, "compaction_victim", partial(volume.compaction_victim, 0))
    assert volume.compaction_victim() is not None
    with pytest.raises(OSError):  # housekeeping logs it and waits before trying again
        trio.run(worker._compact, volume)
    assert len(forks) == 1
    monkeypatch.undo()
    volume.close()


def test_a_request_may_complete_the_writer_the_worker_waits_for(tmp_path):
    """On a full disk a request's commit checkpoints in-process, reaping the forked writer
    that housekeeping waits for; housekeeping must take that in its stride."""
    volume = _volume_with_garbage(tmp_path)

    async def request():  # runs once the writer is forked, and blocks until it ends
        await trio.sleep(0)
        volume.checkpoint()

    async def both():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(request)
            await worker._checkpoint(volume)

    trio.run(both)
    assert not volume.checkpoints.running
    volume.close()


def test_a_writeback_error_the_writer_saw_fails_every_later_sync(tmp_path, monkeypatch):
    """The kernel reports a writeback error to one fsync per open file: if the writer's
    flush took it, the server must not acknowledge later fsyncs."""
    volume = _volume_with_garbage(tmp_path)
    _create(volume, b"unsynced", b"y" * 5000)

    def broken_disk(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken_disk)  # in the child too
    pid = volume.fork_checkpoint()
    monkeypatch.undo()
    _, status = os.waitpid(pid, 0)
    assert not volume.checkpoints.end(status)
    _create(volume, b"later", b"z" * 100)
    with pytest.raises(OSError) as failed:
        volume.sync()
    assert failed.value.errno == errno.EIO
    volume.close()  # the checkpoint at close fails too; the next mount replays the log
    again = StoreRoot(tmp_path / "store").open_volume("v")
    assert again.log.failed is None
    again.close()
