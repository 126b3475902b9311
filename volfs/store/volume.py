"""A served volume: its state (`VolumeState`), and every change journaled to the log first.

`Volume` is the persistent model under the FUSE operations.  Its mutating methods assume the
caller has already checked POSIX rules (the FUSE layer does that and picks the errno); each
method builds the records of one operation (`volfs.store.records`), appends them as one frame,
and only then applies them to memory with `VolumeState.apply`, the code that replays the log at
mount.  So the state after a crash is exactly the state built from the frames that reached the
store.

It is a `VolumeState` with a writing log (`SegmentLog`) and two helpers it owns: `Checkpointer`
(`volfs.store.checkpoints`: checkpoints, in-process or forked) and `Space`
(`volfs.store.space`: compaction, reclaim, the reserve, a sized volume's log bound).  The
methods the worker calls on those are kept here as one-line delegations, so callers see one
object.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence

from volfs.errors import ErrorCode, StoreError
from volfs.store import frame, headers, holes, journal, records
from volfs.store.checkpoints import Checkpointer
from volfs.store.log import Position, SegmentLog
from volfs.store.records import (
    ExchangeRecord,
    InodeRecord,
    LinkRecord,
    Record,
    RenameRecord,
    UnlinkRecord,
    WriteRecord,
    XattrRecord,
)
from volfs.store.space import COMPACT_MIN_GARBAGE, RECLAIM_MIN, Space, segment_size_for
from volfs.store.state import (
    ENTRY_COST,
    EXTENT_COST,
    INODE_COST,
    ROOT_INO,
    XATTR_COST,
    Inode,
    VolumeState,
    dir_entries,
    new_root,
)

__all__ = ["ROOT_INO", "Inode", "Volume"]  # what the FUSE layer and the worker import

logger = logging.getLogger(__name__)


def _touched(inode: Inode, now_ns: int, mtime: bool = True) -> InodeRecord:
    """The INODE record of *inode* with its change (and modification) time set to now."""
    return inode.record(mtime_ns=now_ns if mtime else None, ctime_ns=now_ns)


def _touched_parents(a: Inode, b: Inode, now_ns: int) -> list[Record]:
    return [_touched(a, now_ns)] if a is b else [_touched(p, now_ns) for p in (a, b)]


def _write_charge(inode: Inode, offset: int, length: int) -> int:
    """What writing *length* bytes at *offset* of *inode* would add to the volume's charge:
    the bytes that fill holes, and the extents it adds (an overwrite of whole extents
    adds none; one inside an extent splits it)."""
    if inode.extents is None:
        raise TypeError(f"inode {inode.ino} is not a regular file")
    new_bytes, extents = inode.extents.change(offset, offset + length)
    return new_bytes + EXTENT_COST * extents


class Volume(VolumeState):
    """The live state of one volume and the log that makes it durable."""

    log: SegmentLog

    def __init__(
        self, name: str, dir_fd: int, lock_fd: int, volume_id: str, segment_size: int
    ) -> None:
        super().__init__(name, dir_fd, SegmentLog(dir_fd, volume_id, segment_size))
        self._lock_fd = lock_fd
        self.checkpoints = Checkpointer(self)
        self.space = Space(self)
        self._synced_head = Position(0, 0)  # log head at the last sync
        self.quota = 0  #: most bytes the volume may hold, metadata included; 0: no limit
        self.inode_limit = 0  #: most inodes it may have, the root included; 0: no limit
        self.header: dict[str, object] = {}  #: its header file, as `StoreRoot.open_volume` read it
        self._saved_usage: dict[str, object] | None = None

    def load(self, now_ns: int) -> None:
        """Rebuild the state from the checkpoint and the log after it; create a new volume."""
        head = self.load_state()
        self._free_unlinked()
        self.log.start_appending(head)
        self.space.keep_reserve()
        if ROOT_INO not in self.inodes:
            root = new_root(self.header)
            root.atime_ns = root.mtime_ns = root.ctime_ns = now_ns
            self.commit([root.record()])

    def _cut_tail(self, at: Position, reason: str) -> None:
        dropped = self.log.discard_after(at)
        logger.warning(
            "volume %s: dropped %d bytes of torn log tail at segment %d offset %d (%s): "
            "writes that were never acknowledged or never synced",
            self.name,
            dropped,
            at.seg,
            at.pos,
            reason,
        )

    # -- committing -------------------------------------------------------------------------

    def commit(
        self,
        items: Sequence[Record],
        data: bytes = b"",
        *,
        charge: int = 0,
        inodes: int = 0,
        compacting: bool = False,
    ) -> None:
        """Journal *items* (the records of one operation) as one frame, then apply them.

        The operation adds *charge* bytes and *inodes* inodes to what the volume holds: past
        its size or inode limit it is refused with `NoSpace` before anything is written.  A
        sized volume keeps its log within `Space.log_limit` by compacting here what
        housekeeping has not yet (except for the appends of compaction itself, *compacting*).

        On a full disk, dead data is freed (`reclaim`) and the append tried once more: a
        failed append leaves nothing behind, and deleting files must make room again.
        """
        self.space.check_room(charge, inodes)
        buffers = frame.encode(records.encode_all(items), data)
        if self.quota and not compacting:
            length = sum(map(len, buffers))
            if self.log.total - self.space.exempt + length > self.space.log_limit:
                self.space.make_room(length, charge > 0 or bool(data))
        try:
            at, data_pos = self.log.append_frame(buffers)
        except OSError as exc:
            if exc.errno != errno.ENOSPC or self.space.reclaimable() < RECLAIM_MIN:
                raise
            logger.warning("volume %s: the disk is full; freeing the space of dead data", self.name)
            self.reclaim()
            at, data_pos = self.log.append_frame(buffers)
        self.checkpoints.appended += data_pos + len(data) - at.pos
        self.apply(items, at.seg, data_pos)

    # -- operations -------------------------------------------------------------------------

    def new_inode(self, mode: int, uid: int, gid: int, rdev: int, now_ns: int) -> Inode:
        """An inode that exists only in memory until a record for it is committed."""
        inode = Inode(self.next_ino, mode)
        self.next_ino += 1
        inode.uid, inode.gid, inode.rdev = uid, gid, rdev
        inode.atime_ns = inode.mtime_ns = inode.ctime_ns = now_ns
        return inode

    def set_attrs(
        self,
        inode: Inode,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        ctime_ns: int,
    ) -> None:
        record = inode.record(mode=mode, uid=uid, gid=gid, size=size, atime_ns=atime_ns,
                              mtime_ns=mtime_ns, ctime_ns=ctime_ns)  # fmt: skip
        self.commit([record])  # a size adds holes or drops data: nothing to charge
        self._recharge(inode)

    def create(self, parent: Inode, name: bytes, inode: Inode, now_ns: int) -> None:
        """Add the new *inode* (from `new_inode`) to the volume as *parent*/*name*."""
        self.commit(
            [inode.record(), LinkRecord(parent.ino, name, inode.ino), _touched(parent, now_ns)],
            charge=INODE_COST + len(inode.target or b"") + ENTRY_COST + len(name),
            inodes=1,
        )

    def link(self, inode: Inode, parent: Inode, name: bytes, now_ns: int) -> None:
        self.commit(
            [
                LinkRecord(parent.ino, name, inode.ino),
                _touched(inode, now_ns, mtime=False),
                _touched(parent, now_ns),
            ],
            charge=ENTRY_COST + len(name),
        )

    def unlink(self, parent: Inode, name: bytes, child: Inode, now_ns: int) -> None:
        items: list[Record] = [UnlinkRecord(parent.ino, name), _touched(parent, now_ns)]
        if child.entries is None:  # its ctime changes with its link count
            items.append(_touched(child, now_ns, mtime=False))
        self.commit(items)
        self.forget(child)

    def rename(
        self,
        old_parent: Inode,
        old_name: bytes,
        new_parent: Inode,
        new_name: bytes,
        replaced: Inode | None,
        now_ns: int,
    ) -> None:
        """Move an entry, replacing *replaced* (the inode at the new name) if given.

        The frame holds no UNLINK for *replaced*: the RENAME record itself takes the link
        the new name gave it (ARCHITECTURE.md, "Records")."""
        old_entries, new_entries = dir_entries(old_parent), dir_entries(new_parent)
        items: list[Record] = [RenameRecord(old_parent.ino, old_name, new_parent.ino, new_name)]
        items += _touched_parents(old_parent, new_parent, now_ns)
        moved = self.inodes[old_entries[old_name]]
        items.append(_touched(moved, now_ns, mtime=False))
        if replaced is not None and replaced.entries is None:
            items.append(_touched(replaced, now_ns, mtime=False))
        if new_name in new_entries:  # that entry stays, naming the moved inode
            charge = -ENTRY_COST - len(old_name)
        else:  # the entry takes the new name
            charge = len(new_name) - len(old_name)
        self.commit(items, charge=charge)
        if replaced is not None:
            self.forget(replaced)

    def exchange(
        self, parent_a: Inode, name_a: bytes, parent_b: Inode, name_b: bytes, now_ns: int
    ) -> None:
        items: list[Record] = [ExchangeRecord(parent_a.ino, name_a, parent_b.ino, name_b)]
        items += _touched_parents(parent_a, parent_b, now_ns)
        for parent, name in ((parent_a, name_a), (parent_b, name_b)):
            items.append(_touched(self.inodes[dir_entries(parent)[name]], now_ns, False))
        self.commit(items)

    def set_xattr(self, inode: Inode, name: bytes, value: bytes | None, now_ns: int) -> None:
        old = None if inode.xattrs is None else inode.xattrs.get(name)
        charge = 0 if value is None else XATTR_COST + len(name) + len(value)
        if old is not None:
            charge -= XATTR_COST + len(name) + len(old)
        self.commit(
            [XattrRecord(inode.ino, name, value), _touched(inode, now_ns, mtime=False)],
            charge=charge,
        )
        self._recharge(inode)

    def write(self, inode: Inode, offset: int, data: bytes, now_ns: int) -> None:
        """Write *data* at *offset*; `NoSpace` if it would take the volume past its size."""
        charge = _write_charge(inode, offset, len(data)) if self.quota else 0
        sums = frame.block_sums(data)
        self.commit([WriteRecord(inode.ino, offset, len(data), sums, now_ns)], data, charge=charge)

    def fallocate(self, inode: Inode, offset: int, length: int, now_ns: int, *,
                  keep_size: bool = False, punch: bool = False) -> None:  # fmt: skip
        """fallocate(2) on [offset, offset+length): allocate it (zeros in its holes; the file
        grows to its end unless *keep_size*), or with *punch* make it a hole, size kept
        (`volfs.store.holes`).  `NoSpace` if an allocation does not fit the volume's size."""
        if punch:
            holes.punch(self, inode, offset, length, now_ns)
        else:
            holes.allocate(self, inode, offset, length, keep_size, now_ns)
        self._recharge(inode)

    def forget(self, inode: Inode) -> None:
        """Let go of an unlinked inode, with its data, once nothing can reach it any more.

        Not at its last close: while the kernel holds a reference (a lookup), a process that
        resolved the name just before the unlink may still open it, and must read its data,
        not zeros.  The kernel forgets an unlinked inode as soon as its last user is gone.
        """
        if inode.nlink or inode.opens > 0 or inode.ino == ROOT_INO:
            self._leaving_charge -= self._leaving.pop(inode, 0)
        elif inode.lookups > 0:
            self._leaving_charge -= self._leaving.pop(inode, 0)
            # Its space counts as free already (`used_by_files`).
            self._leaving[inode] = charge = self._charge_of(inode)
            self._leaving_charge += charge
        else:
            self._leaving_charge -= self._leaving.pop(inode, 0)
            self._free(inode)

    def _recharge(self, inode: Inode) -> None:
        """Count anew what a waiting inode (`forget`) holds: reached through /proc/PID/fd,
        it can still be changed."""
        if inode in self._leaving:
            self.forget(inode)

    # -- durability -------------------------------------------------------------------------

    def sync(self) -> None:
        """Make everything committed so far durable (a no-op if nothing changed since)."""
        if self.log.head != self._synced_head:
            self._synced_head = self.log.sync()

    def checkpoint(self) -> None:
        """Write the whole state as a checkpoint, now (`Checkpointer.write`)."""
        self.checkpoints.write()

    def fork_checkpoint(self) -> int:
        """Start a checkpoint in a child process; its pid (`Checkpointer.fork`)."""
        return self.checkpoints.fork()

    def wait_checkpoint(self) -> bool:
        """Wait for a forked checkpoint to end and complete it (`Checkpointer.wait`)."""
        return self.checkpoints.wait()

    @property
    def checkpoint_due(self) -> bool:
        return self.checkpoints.due

    def close(self, checkpoint: bool = True) -> None:
        """Checkpoint (so the next mount starts fast), close the log, release the volume.

        ``checkpoint=False`` leaves the store as a killed process would: tests use it.
        """
        try:
            if checkpoint:
                try:
                    self.checkpoint()
                    self.save_usage()
                except OSError as exc:  # a full disk, say: nothing is lost, replay covers it
                    logger.warning(
                        "volume %s: no checkpoint at close (%s); the next mount replays the log",
                        self.name,
                        exc,
                    )
        finally:
            self.checkpoints.kill()  # as if killed: its writer dies with it
            self.log.close()
            os.close(self.dir_fd)
            os.close(self._lock_fd)

    # -- space (`Space`) ----------------------------------------------------------------------

    def compaction_victim(self, min_garbage: int = COMPACT_MIN_GARBAGE) -> int | None:
        """The sealed segment most worth compacting, if any (`Space.compaction_victim`)."""
        return self.space.compaction_victim(min_garbage)

    def live_ranges(self) -> dict[int, list[tuple[int, int, int]]]:
        """(ino, start, length) of every extent in use, by segment (`Space.live_ranges`)."""
        return self.space.live_ranges()

    def relocate(self, ino: int, start: int, length: int, seg: int) -> None:
        """Copy live data of *ino* out of segment *seg* (`Space.relocate`)."""
        self.space.relocate(ino, start, length, seg)

    @property
    def reclaim_due(self) -> bool:
        return self.space.reclaim_due

    def reclaim(self) -> int:
        """Give the space of dead data back to the disk, now (`Space.reclaim`)."""
        return self.space.reclaim()

    # -- limits and figures -------------------------------------------------------------------

    def set_limits(self, size: int, inodes: int) -> None:
        """Give the volume a new size and inode limit (0: none), now and in its header.

        Refused (`StoreError`) below what the volume holds.  A smaller size may make the
        segments the log starts from now on smaller too, as the disk-use bound needs; they
        never grow again: replay takes a segment shorter than the segment size, followed by
        another, for a gap a power cut left, so a larger size would make older segments look
        like gaps.  For the same reason the log is made durable first: a smaller size must
        never judge a segment whose end a power cut could still take.
        """
        if size < 0 or inodes < 0:
            raise StoreError(
                f"volume {self.name}: sizes and inode limits cannot be negative", ErrorCode.INVALID
            )
        if size and size < self.used_by_files:
            raise StoreError(
                f"volume {self.name} holds {self.used_by_files} bytes: "
                f"it cannot be made smaller than that ({size})",
                ErrorCode.INVALID,
            )
        if inodes and inodes < self.inodes_used:
            raise StoreError(
                f"volume {self.name} has {self.inodes_used} inodes: "
                f"its inode limit cannot be lower than that ({inodes})",
                ErrorCode.INVALID,
            )
        segment_size = min(self.log.segment_size, segment_size_for(size))
        header = {**self.header, "size": size, "inodes": inodes, "segment_size": segment_size}
        if segment_size < self.log.segment_size:
            self.sync()
        journal.write_durably(self.dir_fd, headers.HEADER_FILE, b"".join(frame.encode(header)))
        self.header = header
        self.quota, self.inode_limit = size, inodes
        self.log.segment_size = segment_size
        self.space.keep_reserve()
        logger.info("volume %s: size %d, inode limit %d", self.name, size, inodes)

    def disk_stats(self) -> os.statvfs_result:
        """Capacity figures of the file system that holds the store."""
        return os.statvfs(self.dir_fd)

    def save_usage(self) -> None:
        """Write the usage figures for `volfsd ls` if they changed (no fsync: advisory)."""
        # With the bytes in use of each segment, by which `ls` tells what snapshots alone hold.
        figures: dict[str, object] = {"used": self.used_by_files, "inodes": self.inodes_used}
        live = headers.live_of(self.live)
        if live is not None:
            figures["live"] = live
        if figures != self._saved_usage:
            headers.write_usage(self.dir_fd, figures)
            self._saved_usage = figures
