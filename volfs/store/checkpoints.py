"""Checkpoints of a served volume: planned, written (in-process or by a forked child), finished.

A checkpoint is the whole state as records (`state_records`) in the checkpoint file
(`journal.write_checkpoint`), covering the log up to one position.  `Checkpointer` runs the
process side of it for one `Volume`: forking the writer, tying the child's life to the server
(`PR_SET_PDEATHSIG`), reaping it (the worker watches a pidfd of it in the trio loop) and only
then taking the new start position and deleting the segments that were dead at the fork.
ARCHITECTURE.md ("Checkpoint") says why it forks and what it costs.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import logging
import os
import signal
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

from volfs.store import journal, records
from volfs.store.log import Position, libc
from volfs.store.records import (
    FORMAT,
    CheckpointRecord,
    ExtentsRecord,
    LinkRecord,
    RawRecord,
    StoredExtent,
    XattrRecord,
)
from volfs.store.state import VolumeState

if TYPE_CHECKING:
    from volfs.store.volume import Volume

logger = logging.getLogger(__name__)

#: Take a checkpoint when the log has grown this much since the last one, or by the size of
#: the last checkpoint if that is larger, so checkpoint cost stays proportional to writes.
CHECKPOINT_AFTER = 256 * 1024 * 1024

_PR_SET_PDEATHSIG = 1
#: Exit code of a checkpoint writer whose flush of the log failed.
_FLUSH_FAILED = 3


class CheckpointPlan(NamedTuple):
    end: Position  #: the checkpoint covers the log up to here
    dead: list[int]  #: segments it lets go
    appended: int  #: log bytes appended since the previous checkpoint, up to *end*
    parent: int  #: pid of the server
    started: float  #: `time.monotonic` when it was planned


def detach_from_parent(parent: int) -> None:
    """Make a forked child independent of the server's signal handling, and have the kernel
    kill it when *parent*, its forking thread, ends."""
    # The server's handlers (trio's) and its wakeup fd would hand the child's signals to the
    # server's event loop; the child only needs the default action.
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # it ended before the request took effect
        os._exit(1)


def state_records(state: VolumeState, end: Position) -> Iterator[RawRecord]:
    """The records of a checkpoint of *state* covering the log up to *end*, encoded."""
    yield records.encode(CheckpointRecord(FORMAT, end.seg, end.pos, state.next_ino))
    for inode in state.inodes.values():
        yield records.encode(inode.record())
        if inode.xattrs:
            for name, value in inode.xattrs.items():
                yield records.encode(XattrRecord(inode.ino, name, value))
        if inode.extents:
            stored = [
                StoredExtent(e.start, e.length, e.skip, f.seg, f.pos, f.length, list(f.sums))
                for e in inode.extents
                for f in (e.frame,)
            ]
            yield records.encode(ExtentsRecord(inode.ino, stored))
    for inode in state.inodes.values():
        if inode.entries is not None:
            for name, ino in inode.entries.items():
                yield records.encode(LinkRecord(inode.ino, name, ino))


class Checkpointer:
    """The checkpoints of one served volume: when one is due, and its writer, if forked."""

    def __init__(self, volume: Volume) -> None:
        self._volume = volume
        self.size = 0  #: bytes of the last checkpoint written
        self.appended = 0  #: log bytes appended since the last checkpoint
        self._forked: tuple[int, CheckpointPlan] | None = None  #: the writer, if any
        self.written = 0  #: checkpoints completed since the volume was opened (for metrics)
        self.seconds = 0.0  #: their time, from planning to completion

    @property
    def due(self) -> bool:
        return self.appended > max(CHECKPOINT_AFTER, self.size)

    @property
    def running(self) -> bool:
        return self._forked is not None

    def write(self) -> None:
        """Write the whole state as a checkpoint, now, so replay starts from the log's end."""
        self.wait()
        volume = self._volume
        plan = self._plan(volume.log.sync())
        journal.write_checkpoint(volume.dir_fd, state_records(volume, plan.end))
        self._finish(plan)

    def fork(self) -> int:
        """Start writing a checkpoint in a child process; return the child's pid.

        The child writes from a copy-on-write image of this process's memory, so it sees the
        state exactly as it is now while this process goes on serving requests.  Once the
        child has ended, `wait` (or `end` with its wait status) completes the checkpoint;
        nothing else reaps it.  The child holds the volume's lock while it lives and is
        killed if this process dies, so no later server can meet it writing.
        """
        self.wait()
        volume = self._volume
        plan = self._plan(volume.log.head)
        pid = os.fork()
        if pid == 0:  # the child: never returns to the caller
            self._write_in_child(plan)
        self._forked = (pid, plan)
        return pid

    def _write_in_child(self, plan: CheckpointPlan) -> None:
        volume = self._volume
        code = 1
        try:
            gc.disable()  # a collection would only copy pages the parent still shares
            detach_from_parent(plan.parent)
            # The log the checkpoint points into must be durable before it is; flushing it
            # here spares the server a wait of up to CHECKPOINT_AFTER bytes of writeback.
            try:
                volume.log.flush()
            except OSError:
                # The kernel reported the writeback error to this process only: the server
                # must learn it from the exit code (see `SegmentLog.fail`).
                code = _FLUSH_FAILED
                raise
            journal.write_checkpoint(volume.dir_fd, state_records(volume, plan.end))
            code = 0
        except BaseException:
            logger.exception("volume %s: writing a checkpoint failed", volume.name)
        finally:
            os._exit(code)

    def end(self, status: int) -> bool:
        """Complete the forked checkpoint whose child ended with wait status *status*;
        return whether it was written."""
        if self._forked is None:
            raise RuntimeError("no checkpoint writer is running")
        pid, plan = self._forked
        self._forked = None
        code = os.waitstatus_to_exitcode(status)
        volume = self._volume
        if code == _FLUSH_FAILED:
            volume.log.fail(OSError(errno.EIO, f"checkpoint writer {pid} could not flush the log"))
        if code != 0:
            logger.error(
                "volume %s: checkpoint writer %d failed (exit code %d)", volume.name, pid, code
            )
            return False
        self._finish(plan)
        return True

    def wait(self) -> bool:
        """Wait for a forked checkpoint to end and complete it; return whether it was
        written (True if none was running: whoever waited for it has completed it)."""
        if self._forked is None:
            return True
        _, status = os.waitpid(self._forked[0], 0)
        return self.end(status)

    def kill(self) -> None:
        """End a running writer as if the server had been killed: its checkpoint is lost."""
        if self._forked is not None:
            os.kill(self._forked[0], signal.SIGKILL)
            os.waitpid(self._forked[0], 0)
            self._forked = None

    def _plan(self, end: Position) -> CheckpointPlan:
        """What a checkpoint of the state now, covering the log up to *end*, changes."""
        volume = self._volume
        # Sealed segments no file uses now are not referenced by a checkpoint of this state,
        # and no later change puts data into a sealed segment.
        dead = [s for s in volume.log.segments if s < end.seg and volume.live.get(s, 0) == 0]
        return CheckpointPlan(end, dead, self.appended, os.getpid(), time.monotonic())

    def _finish(self, plan: CheckpointPlan) -> None:
        """Take a checkpoint of the state at *plan.end*, now on disk, as the new start."""
        volume = self._volume
        self.size = os.stat(journal.CHECKPOINT_FILE, dir_fd=volume.dir_fd).st_size
        self.written += 1
        self.seconds += time.monotonic() - plan.started
        volume.checkpoint_at = plan.end
        self.appended -= plan.appended
        for seg in plan.dead:
            volume.log.remove_segment(seg)
            volume.live.pop(seg, None)
            volume.extents_in.pop(seg, None)
            volume.space.forget_segment(seg)
        volume.log.sync_names()
