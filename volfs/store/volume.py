"""One volume: its metadata held in memory, every change journaled to the log before it counts.

`Volume` is the persistent model under the FUSE operations.  Its mutating methods assume the
caller has already checked POSIX rules (the FUSE layer does that and picks the errno); each
method builds the journal records for one operation, appends them as one frame, and only then
applies them to memory through `_apply`, the same code that replays the log at mount.  So the
state after a crash is exactly the state built from the frames that reached the store.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import logging
import os
import signal
import stat
from collections.abc import Iterator
from typing import NamedTuple

from volfs.errors import DataDamaged, NoSpace, StoreError, VolumeDamaged
from volfs.store import frame, journal
from volfs.store.extents import CHUNK_SIZE, Extent, ExtentMap, Frame, extents_of
from volfs.store.journal import (
    CHECKPOINT,
    EXCHANGE,
    EXTENTS,
    INODE,
    LINK,
    RENAME,
    UNLINK,
    WRITE,
    XATTR,
)
from volfs.store.log import LogDamage, Position, SegmentLog, libc

log = logging.getLogger(__name__)

ROOT_INO = 1
FORMAT = 1
#: Take a checkpoint when the log has grown this much since the last one, or by the size of
#: the last checkpoint if that is larger, so checkpoint cost stays proportional to writes.
CHECKPOINT_AFTER = 256 * 1024 * 1024
#: File in the volume directory with the figures `volfsd ls` shows for the volume.
USAGE_FILE = "usage"
#: Compact once the log holds more dead bytes than live ones, and at least this many.
COMPACT_MIN_GARBAGE = 64 * 1024 * 1024
#: A file of this size kept in the volume directory, given up when the disk is full so that
#: the checkpoint which lets `reclaim` free space has room to be written.
RESERVE_FILE = "reserve"
RESERVE_SIZE = 8 * 1024 * 1024
#: Free dead data in place (`Volume.reclaim`) when the disk has less free space than this and
#: at least RECLAIM_MIN bytes of dead data still take disk space.
RECLAIM_FREE_BELOW = 256 * 1024 * 1024
RECLAIM_MIN = 1024 * 1024

#: What a volume's size is charged with besides the bytes of file data (ARCHITECTURE.md,
#: "Quota").  Each is at least what the store keeps of the item for good (its checkpoint
#: record; for an extent also the frame compaction would copy it into), so what a volume
#: holds, metadata included, stays within its size and its disk use within a bound of it.
INODE_COST = 128  #: each inode but the root directory (plus a symlink's target bytes)
ENTRY_COST = 32  #: each directory entry, plus its name's bytes
XATTR_COST = 32  #: each extended attribute, plus its name's and value's bytes
EXTENT_COST = 256  #: each extent (a piece of a file stored by one write), plus its bytes
#: The largest frame an operation appends: a 1 MiB FUSE write with its meta part, with room
#: to spare (an xattr value is at most 64 KiB, a symlink target 4 KiB, names 255 bytes).
MAX_FRAME = CHUNK_SIZE + 64 * 1024
#: Segments of a sized volume: an eighth of its size, within these bounds.  The disk-use
#: bound of a sized volume is 2 x size + 2 segments + 4 MiB (`Volume.log_limit`).
MIN_SEGMENT_SIZE = 1024 * 1024
MAX_SEGMENT_SIZE = 64 * 1024 * 1024


def segment_size_for(size: int) -> int:
    """The segment size for a volume of *size* bytes (0: no size, the largest)."""
    if not size:
        return MAX_SEGMENT_SIZE
    return max(MIN_SEGMENT_SIZE, min(MAX_SEGMENT_SIZE, size // 8))


def log_bound(size: int, segment_size: int) -> int:
    """Most bytes the log of a volume of *size* (holding no more than that) ever takes."""
    return 2 * size + 2 * segment_size + 4 * 1024 * 1024


class _CheckpointPlan(NamedTuple):
    end: Position  #: the checkpoint covers the log up to here
    dead: list[int]  #: segments it lets go
    appended: int  #: log bytes appended since the previous checkpoint, up to *end*
    parent: int  #: pid of the server


_PR_SET_PDEATHSIG = 1
#: Exit code of a checkpoint writer whose flush of the log failed.
_FLUSH_FAILED = 3


def _detach_from_parent(parent: int) -> None:
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


#: Values many inodes share (modes, owners): one int object each instead of one per inode.
_SHARED: dict[int, int] = {}
_SHARED_MAX = 4096


def _shared(value: int) -> int:
    shared = _SHARED.get(value)
    if shared is not None:
        return shared
    if len(_SHARED) < _SHARED_MAX:
        _SHARED[value] = value
    return value


class Inode:
    __slots__ = (
        "atime_ns",
        "ctime_ns",
        "entries",
        "extents",
        "gid",
        "ino",
        "lookups",
        "mode",
        "mtime_ns",
        "nlink",
        "opens",
        "parent",
        "rdev",
        "size",
        "stored",
        "target",
        "uid",
        "xattrs",
    )

    def __init__(self, ino: int, mode: int) -> None:
        self.ino = ino
        self.mode = mode
        self.uid = self.gid = self.rdev = self.size = 0
        self.stored = 0  #: bytes of data in the log (holes excluded)
        self.atime_ns = self.mtime_ns = self.ctime_ns = 0
        self.target: bytes | None = None
        self.xattrs: dict[bytes, bytes] | None = None
        #: name -> inode number, for a directory
        self.entries: dict[bytes, int] | None = {} if stat.S_ISDIR(mode) else None
        self.extents = ExtentMap() if stat.S_ISREG(mode) else None
        self.parent = 0
        # A directory counts "." and its entry in the parent; the root is its own parent.
        self.nlink = (2 if ino == ROOT_INO else 1) if stat.S_ISDIR(mode) else 0
        self.lookups = 0  #: references the kernel holds (lookup counts)
        self.opens = 0  #: open file handles

    def record(self) -> list:
        return [
            INODE,
            self.ino,
            self.mode,
            self.uid,
            self.gid,
            self.rdev,
            self.size,
            self.atime_ns,
            self.mtime_ns,
            self.ctime_ns,
            self.target,
        ]


class Volume:
    """The live state of one volume and the log that makes it durable."""

    def __init__(
        self, name: str, dir_fd: int, lock_fd: int, volume_id: str, segment_size: int
    ) -> None:
        self.name = name
        self._dir_fd = dir_fd
        self._lock_fd = lock_fd
        self.log = SegmentLog(dir_fd, volume_id, segment_size)
        self.inodes: dict[int, Inode] = {}
        self.live: dict[int, int] = {}  #: segment -> bytes of it that files still use
        self.used = 0  #: bytes of file data the volume holds (the sum of ``live``)
        self.extents_in: dict[int, int] = {}  #: segment -> extents whose data lies in it
        self.extent_count = 0  #: extents of all files (the sum of ``extents_in``)
        #: What inodes, directory entries, xattrs and symlink targets are charged (`INODE_COST`).
        self.meta_used = 0
        #: Unlinked and closed inodes whose data waits for the kernel to forget them, with
        #: what each was charged when it began to wait (it counts as free already).
        self._leaving: dict[Inode, int] = {}
        self._leaving_charge = 0
        self.next_ino = ROOT_INO + 1
        self.checkpoint_at = Position(0, 0)
        self._checkpoint_size = 0
        self._appended_since_checkpoint = 0
        self._unmovable: set[int] = set()  # segments holding damaged live data
        self._punched: dict[int, int] = {}  # segment -> its dead bytes when last punched
        self._synced_head = Position(0, 0)  # log head at the last sync
        self.quota = 0  #: most bytes the volume may hold, metadata included; 0: no limit
        self.inode_limit = 0  #: most inodes it may have, the root included; 0: no limit
        self.header: dict = {}  #: the volume's header file, as `StoreRoot.open_volume` read it
        self._saved_usage: dict | None = None
        self._forked: tuple[int, _CheckpointPlan] | None = None  #: checkpoint writer, if any

    # -- opening and replay ---------------------------------------------------------------

    def load(self, now_ns: int) -> None:
        """Rebuild the state from the checkpoint and the log after it; create a new volume."""
        start = Position(0, 0)
        try:
            records = journal.read_checkpoint(self._dir_fd)
            if records is not None:
                for record in records:
                    if record[0] == CHECKPOINT:
                        start = Position(record[2], record[3])
                        self.next_ino = record[4]
                    else:
                        self._apply(record, 0, 0)
        except (journal.CheckpointDamage, LookupError, TypeError, ValueError) as exc:
            raise VolumeDamaged(f"volume {self.name}: checkpoint is damaged: {exc}") from None
        self.checkpoint_at = start
        head = self._replay(start)
        for ino in [i.ino for i in self.inodes.values() if i.nlink == 0]:
            self._free(self.inodes[ino])  # open but unlinked when the volume went down
        self.log.start_appending(head)
        self._keep_reserve()
        if ROOT_INO not in self.inodes:
            root = Inode(ROOT_INO, stat.S_IFDIR | 0o755)
            root.uid, root.gid = os.getuid(), os.getgid()
            root.atime_ns = root.mtime_ns = root.ctime_ns = now_ns
            self.commit([root.record()])

    def _replay(self, start: Position) -> Position:
        """Apply every intact frame after *start*; cut off a torn tail; return the log's end.

        A frame that fails its checksums beyond the last durable point is a torn write, never
        acknowledged as durable: it and all after it go.  Before that point the damage is
        decay of durable data: metadata damage refuses the mount, data damage is kept so
        that reads of it report EIO.
        """
        head = start
        proven = max(start, self.log.durable_mark())
        try:
            for lf in self.log.frames(start):
                if lf.data_len and lf.at >= proven and not self._data_intact(lf):
                    self._cut_tail(lf.at, "data part does not match its checksums")
                    return lf.at
                try:
                    for record in lf.meta:
                        self._apply(record, lf.at.seg, lf.data_pos)
                except (LookupError, TypeError, ValueError) as exc:
                    raise VolumeDamaged(
                        f"volume {self.name}: log record at segment {lf.at.seg} offset "
                        f"{lf.at.pos} does not fit the volume ({exc!r}); run fsck"
                    ) from None
                head = lf.end
        except LogDamage as damage:
            if damage.at < proven:
                raise VolumeDamaged(
                    f"volume {self.name}: log damaged before its last durable point, at {damage}"
                ) from None
            self._cut_tail(damage.at, damage.reason)
            return damage.at
        return head

    def _data_intact(self, lf) -> bool:
        write = next((r for r in lf.meta if r[0] == WRITE), None)
        if write is None or write[3] != lf.data_len:
            return False
        data = self.log.read(lf.at.seg, lf.data_pos, lf.data_len)
        return not frame.bad_blocks(data, 0, write[4])

    def _cut_tail(self, at: Position, reason: str) -> None:
        dropped = self.log.discard_after(at)
        log.warning(
            "volume %s: dropped %d bytes of torn log tail at segment %d offset %d (%s): "
            "writes that were never acknowledged or never synced",
            self.name,
            dropped,
            at.seg,
            at.pos,
            reason,
        )

    # -- applying records (live and replay) -------------------------------------------------

    def _apply(self, record: list, seg: int, data_pos: int) -> None:
        kind = record[0]
        if kind == WRITE:
            _, ino, offset, length, sums, mtime_ns = record
            inode = self.inodes[ino]
            self._put(inode, offset, Frame(seg, data_pos, length, tuple(sums)))
            if mtime_ns is not None:
                inode.size = max(inode.size, offset + length)
                inode.mtime_ns = inode.ctime_ns = mtime_ns
        elif kind == INODE:
            _, ino, mode, uid, gid, rdev, size, atime, mtime, ctime, target = record
            inode = self.inodes.get(ino)
            if inode is None:
                inode = self.inodes[ino] = Inode(ino, mode)
                self.next_ino = max(self.next_ino, ino + 1)
                if ino != ROOT_INO:
                    self.meta_used += INODE_COST
            elif stat.S_IFMT(mode) != stat.S_IFMT(inode.mode):
                raise ValueError(f"inode {ino} cannot change its type")
            if inode.extents is not None and size < inode.size:
                inode.stored -= self._release(inode.extents.truncate(size))
            inode.mode, inode.uid, inode.gid = _shared(mode), _shared(uid), _shared(gid)
            inode.rdev, inode.size = rdev, size
            # Equal times share one int object (32 bytes each; a volume may hold millions).
            mtime = atime if mtime == atime else mtime
            inode.atime_ns, inode.mtime_ns = atime, mtime
            inode.ctime_ns = mtime if ctime == mtime else ctime
            self.meta_used += len(target or b"") - len(inode.target or b"")
            inode.target = target
        elif kind == LINK:
            _, parent_ino, name, ino = record
            parent, child = self.inodes[parent_ino], self.inodes[ino]
            if name in parent.entries:
                raise ValueError(f"entry {name!r} exists in {parent_ino}")
            parent.entries[name] = child.ino  # one int object for both
            self.meta_used += ENTRY_COST + len(name)
            child.nlink += 1
            if child.entries is not None:
                parent.nlink += 1
                child.parent = parent_ino
        elif kind == UNLINK:
            _, parent_ino, name = record
            parent = self.inodes[parent_ino]
            self._unlinked(parent, self.inodes[parent.entries.pop(name)])
            self.meta_used -= ENTRY_COST + len(name)
        elif kind == RENAME:
            # Onto an existing name, the inode it named loses that link.
            _, old_parent_ino, old_name, new_parent_ino, new_name = record
            old_parent, new_parent = self.inodes[old_parent_ino], self.inodes[new_parent_ino]
            child = self.inodes[old_parent.entries.pop(old_name)]
            self.meta_used -= ENTRY_COST + len(old_name)
            if new_name in new_parent.entries:
                self._unlinked(new_parent, self.inodes[new_parent.entries[new_name]])
            else:
                self.meta_used += ENTRY_COST + len(new_name)
            new_parent.entries[new_name] = child.ino
            if child.entries is not None:
                old_parent.nlink -= 1
                new_parent.nlink += 1
                child.parent = new_parent_ino
        elif kind == EXCHANGE:
            _, parent_a_ino, name_a, parent_b_ino, name_b = record
            parent_a, parent_b = self.inodes[parent_a_ino], self.inodes[parent_b_ino]
            a = self.inodes[parent_a.entries[name_a]]
            b = self.inodes[parent_b.entries[name_b]]
            parent_a.entries[name_a], parent_b.entries[name_b] = b.ino, a.ino
            for child, old, new in ((a, parent_a, parent_b), (b, parent_b, parent_a)):
                if child.entries is not None:
                    old.nlink -= 1
                    new.nlink += 1
                    child.parent = new.ino
        elif kind == XATTR:
            _, ino, name, value = record
            inode = self.inodes[ino]
            old = None if inode.xattrs is None else inode.xattrs.get(name)
            if old is not None:
                self.meta_used -= XATTR_COST + len(name) + len(old)
            if value is not None:
                if inode.xattrs is None:
                    inode.xattrs = {}
                inode.xattrs[name] = value
                self.meta_used += XATTR_COST + len(name) + len(value)
            elif inode.xattrs is not None:
                inode.xattrs.pop(name, None)
        elif kind == EXTENTS:
            _, ino, extents = record
            inode = self.inodes[ino]
            for start, length, skip, eseg, epos, flen, sums in extents:
                self._put(inode, start, Frame(eseg, epos, flen, tuple(sums)), length, skip)
        else:
            raise ValueError(f"unknown record kind {kind!r}")

    @staticmethod
    def _unlinked(parent: Inode, child: Inode) -> None:
        """Count *child*'s link from *parent* as gone."""
        if child.entries is not None:
            parent.nlink -= 1
            child.nlink = 0
        else:
            child.nlink -= 1

    def _put(self, inode: Inode, offset: int, fr: Frame, length: int = -1, skip: int = 0) -> None:
        if length < 0:
            length = fr.length
        inode.stored += length - self._release(inode.extents.put(offset, length, fr, skip))
        self.live[fr.seg] = self.live.get(fr.seg, 0) + length
        self.used += length
        added = extents_of(offset, length)
        self.extents_in[fr.seg] = self.extents_in.get(fr.seg, 0) + added
        self.extent_count += added

    def _release(self, pieces: list[tuple[Frame, int, int]]) -> int:
        """Account for log data no longer used; return how many bytes that was."""
        live, extents_in = self.live, self.extents_in
        total = count = 0
        for fr, length, extents in pieces:
            live[fr.seg] -= length
            extents_in[fr.seg] += extents
            total += length
            count += extents
        self.used -= total
        self.extent_count += count
        return total

    def _free(self, inode: Inode) -> None:
        if inode.extents is not None:
            self._release(inode.extents.truncate(0))
        self.meta_used -= self._own_charge(inode)
        if inode.entries:  # only damage leaves entries in a directory no entry names
            self.meta_used -= sum(ENTRY_COST + len(name) for name in inode.entries)
        del self.inodes[inode.ino]

    # -- what the size is charged with ------------------------------------------------------

    @staticmethod
    def _own_charge(inode: Inode) -> int:
        """What *inode* is charged apart from its data and the entries naming it."""
        charge = 0 if inode.ino == ROOT_INO else INODE_COST
        charge += len(inode.target or b"")
        if inode.xattrs:
            charge += sum(XATTR_COST + len(n) + len(v) for n, v in inode.xattrs.items())
        return charge

    def _charge_of(self, inode: Inode) -> int:
        """All that *inode* is charged but its names (O(its xattrs and chunks))."""
        charge = self._own_charge(inode)
        if inode.extents is not None:
            charge += inode.stored + EXTENT_COST * len(inode.extents)
        return charge

    @property
    def charged(self) -> int:
        """What everything the volume holds is charged, deleted files waiting to go included."""
        return self.used + EXTENT_COST * self.extent_count + self.meta_used

    @property
    def used_by_files(self) -> int:
        """What the volume holds as its size, statfs and `ls` count it: `charged` without
        unlinked, closed files that only wait for the kernel's forget."""
        return self.charged - self._leaving_charge

    @property
    def inodes_used(self) -> int:
        """Inodes as the inode limit and statfs count them (the root included)."""
        return len(self.inodes) - len(self._leaving)

    @property
    def live_cost(self) -> int:
        """What copying all live data to the head of the log would append, at most."""
        return self.used + EXTENT_COST * self.extent_count

    def segment_cost(self, seg: int) -> int:
        """What copying segment *seg*'s live data to the head of the log would append, at most:
        its bytes, and a frame for each extent (`EXTENT_COST` covers one)."""
        return self.live.get(seg, 0) + EXTENT_COST * self.extents_in.get(seg, 0)

    def recount(self) -> dict[str, object]:
        """The running accounting counted afresh from the inodes and the tree (a scan of the
        whole volume: for checks and tests), in the attributes' names."""
        extents_in: dict[int, int] = {}
        meta = 0
        for inode in self.inodes.values():
            meta += self._own_charge(inode)
            for ext in inode.extents or ():
                extents_in[ext.frame.seg] = extents_in.get(ext.frame.seg, 0) + 1
            for name in inode.entries or ():
                meta += ENTRY_COST + len(name)
        return {
            "extents_in": {s: n for s, n in extents_in.items() if n},
            "extent_count": sum(extents_in.values()),
            "meta_used": meta,
            "used": sum(inode.stored for inode in self.inodes.values()),
        }

    def _check_room(self, charge: int, inodes: int = 0) -> None:
        """Refuse (ENOSPC) an operation that would take the volume past its size or its
        inode limit; before anything of it is journaled."""
        if charge > 0 and self.quota and self.used_by_files + charge > self.quota:
            raise NoSpace(errno.ENOSPC, f"volume {self.name} is full")
        if inodes > 0 and self.inode_limit and self.inodes_used + inodes > self.inode_limit:
            raise NoSpace(errno.ENOSPC, f"volume {self.name} has no free inodes")

    def write_charge(self, inode: Inode, offset: int, length: int) -> int:
        """What writing *length* bytes at *offset* of *inode* would add to the volume's charge:
        the bytes that fill holes, and the extents it adds (an overwrite of whole extents
        adds none; one inside an extent splits it)."""
        new_bytes, extents = inode.extents.change(offset, offset + length)
        return new_bytes + EXTENT_COST * extents

    # -- committing -------------------------------------------------------------------------

    def commit(
        self,
        records: list[list],
        data: bytes = b"",
        *,
        charge: int = 0,
        inodes: int = 0,
        compacting: bool = False,
    ) -> None:
        """Journal *records* (one operation) as one frame, then apply them.

        The operation adds *charge* bytes and *inodes* inodes to what the volume holds: past
        its size or inode limit it is refused with `NoSpace` before anything is written.  A
        sized volume keeps its log within `log_limit` by compacting here what housekeeping
        has not yet (except for the appends of compaction itself, *compacting*).

        On a full disk, dead data is freed (`reclaim`) and the append tried once more: a
        failed append leaves nothing behind, and deleting files must make room again.
        """
        self._check_room(charge, inodes)
        buffers = frame.encode(records, data)
        if self.quota and not compacting:
            length = sum(map(len, buffers))
            if self.log.total + length > self.log_limit:
                self._make_room(length, charge > 0 or bool(data))
        try:
            at, data_pos = self.log.append_frame(buffers)
        except OSError as exc:
            if exc.errno != errno.ENOSPC or self.reclaimable() < RECLAIM_MIN:
                raise
            log.warning("volume %s: the disk is full; freeing the space of dead data", self.name)
            self.reclaim()
            at, data_pos = self.log.append_frame(buffers)
        self._appended_since_checkpoint += data_pos + len(data) - at.pos
        for record in records:
            self._apply(record, at.seg, data_pos)

    @property
    def log_limit(self) -> int:
        """How far the log of a sized volume may grow before an append must wait for
        compaction (0: no limit).

        Room for a segment and two frames above twice what the volume holds: then the
        sealed segments hold more than twice the cost of their live data, so one of them is
        at most half live and compacting it frees at least half a segment.  Compaction
        in flight (housekeeping's victim and one compacted here, each at most half a segment
        and a frame) may append beyond it: `log_bound` includes that."""
        if not self.quota:
            return 0
        return 2 * max(self.quota, self.live_cost) + self.log.segment_size + 2 * MAX_FRAME

    def _make_room(self, length: int, needed: bool) -> None:
        """Compact until an append of *length* bytes keeps the log within `log_limit`.

        Housekeeping compacts in the background long before the limit; this catches a
        writer that outruns it.  If nothing can be compacted (damaged data that cannot be
        moved), a write or an operation that adds to the volume (*needed*) gets ENOSPC;
        other changes of metadata (a delete, a chmod) go ahead, so that space can always be
        given back.
        """
        while self.log.total + length > self.log_limit:
            self.log.seal()  # a full head segment: sealed now rather than at the next append
            seg = self._victim(self.log.sizes())
            if seg is None:
                if needed:
                    raise NoSpace(errno.ENOSPC, f"volume {self.name}: its log cannot be compacted")
                return
            log.debug("volume %s: log at its limit; compacting segment %d now", self.name, seg)
            for ino, start, length_ in self.live_ranges()[seg]:
                self.relocate(ino, start, length_, seg)
            self.checkpoint()  # deletes the segment, unless damaged data had to stay in it

    @property
    def checkpoint_due(self) -> bool:
        return self._appended_since_checkpoint > max(CHECKPOINT_AFTER, self._checkpoint_size)

    def new_inode(self, mode: int, uid: int, gid: int, rdev: int, now_ns: int) -> Inode:
        """An inode that exists only in memory until a record for it is committed."""
        inode = Inode(self.next_ino, mode)
        self.next_ino += 1
        inode.uid, inode.gid, inode.rdev = uid, gid, rdev
        inode.atime_ns = inode.mtime_ns = inode.ctime_ns = now_ns
        return inode

    @staticmethod
    def _touched(inode: Inode, now_ns: int, mtime: bool = True) -> list:
        """The INODE record of *inode* with its change (and modification) time set to now."""
        record = inode.record()
        record[9] = now_ns
        if mtime:
            record[8] = now_ns
        return record

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
        record = inode.record()
        for index, value in ((2, mode), (3, uid), (4, gid), (6, size), (7, atime_ns)):
            if value is not None:
                record[index] = value
        if mtime_ns is not None:
            record[8] = mtime_ns
        record[9] = ctime_ns
        self.commit([record])  # a size adds holes or drops data: nothing to charge
        self._recharge(inode)

    def create(self, parent: Inode, name: bytes, inode: Inode, now_ns: int) -> None:
        """Add the new *inode* (from `new_inode`) to the volume as *parent*/*name*."""
        self.commit(
            [inode.record(), [LINK, parent.ino, name, inode.ino], self._touched(parent, now_ns)],
            charge=INODE_COST + len(inode.target or b"") + ENTRY_COST + len(name),
            inodes=1,
        )

    def link(self, inode: Inode, parent: Inode, name: bytes, now_ns: int) -> None:
        self.commit(
            [
                [LINK, parent.ino, name, inode.ino],
                self._touched(inode, now_ns, mtime=False),
                self._touched(parent, now_ns),
            ],
            charge=ENTRY_COST + len(name),
        )

    def unlink(self, parent: Inode, name: bytes, child: Inode, now_ns: int) -> None:
        records = [[UNLINK, parent.ino, name], self._touched(parent, now_ns)]
        if child.entries is None:  # its ctime changes with its link count
            records.append(self._touched(child, now_ns, mtime=False))
        self.commit(records)
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
        """Move an entry, replacing *replaced* (the inode at the new name) if given."""
        records = [[RENAME, old_parent.ino, old_name, new_parent.ino, new_name]]
        records += self._touched_parents(old_parent, new_parent, now_ns)
        moved = self.inodes[old_parent.entries.get(old_name)]
        records.append(self._touched(moved, now_ns, mtime=False))
        if replaced is not None and replaced.entries is None:
            records.append(self._touched(replaced, now_ns, mtime=False))
        if new_name in new_parent.entries:  # that entry stays, naming the moved inode
            charge = -ENTRY_COST - len(old_name)
        else:  # the entry takes the new name
            charge = len(new_name) - len(old_name)
        self.commit(records, charge=charge)
        if replaced is not None:
            self.forget(replaced)

    def exchange(
        self, parent_a: Inode, name_a: bytes, parent_b: Inode, name_b: bytes, now_ns: int
    ) -> None:
        records = [[EXCHANGE, parent_a.ino, name_a, parent_b.ino, name_b]]
        records += self._touched_parents(parent_a, parent_b, now_ns)
        for parent, name in ((parent_a, name_a), (parent_b, name_b)):
            records.append(self._touched(self.inodes[parent.entries.get(name)], now_ns, False))
        self.commit(records)

    def _touched_parents(self, a: Inode, b: Inode, now_ns: int) -> list[list]:
        return [self._touched(a, now_ns)] if a is b else [self._touched(p, now_ns) for p in (a, b)]

    def set_xattr(self, inode: Inode, name: bytes, value: bytes | None, now_ns: int) -> None:
        old = None if inode.xattrs is None else inode.xattrs.get(name)
        charge = 0 if value is None else XATTR_COST + len(name) + len(value)
        if old is not None:
            charge -= XATTR_COST + len(name) + len(old)
        self.commit(
            [[XATTR, inode.ino, name, value], self._touched(inode, now_ns, mtime=False)],
            charge=charge,
        )
        self._recharge(inode)

    def write(self, inode: Inode, offset: int, data: bytes, now_ns: int) -> None:
        """Write *data* at *offset*; `NoSpace` if it would take the volume past its size."""
        charge = self.write_charge(inode, offset, len(data)) if self.quota else 0
        sums = frame.block_sums(data)
        self.commit([[WRITE, inode.ino, offset, len(data), sums, now_ns]], data, charge=charge)

    def read(self, inode: Inode, offset: int, size: int) -> bytes:
        """Read from a regular file; raises `DataDamaged` rather than return wrong bytes."""
        end = min(offset + size, inode.size)
        if offset >= end:
            return b""
        parts = []
        for piece_offset, length, fr, skip in inode.extents.pieces(offset, end):
            if fr is None:
                parts.append(bytes(length))
            else:
                parts.append(self._read_frame(inode, piece_offset, fr, skip, length))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_extent(self, inode: Inode, ext: Extent) -> bytes:
        """The bytes of one extent of *inode*, verified; raises `DataDamaged`."""
        return self._read_frame(inode, ext.start, ext.frame, ext.skip, ext.length)

    def _read_frame(self, inode: Inode, offset: int, fr: Frame, skip: int, length: int) -> bytes:
        first = skip // frame.BLOCK_SIZE
        start = first * frame.BLOCK_SIZE
        stop = min(fr.length, -(-(skip + length) // frame.BLOCK_SIZE) * frame.BLOCK_SIZE)
        try:
            buf = self.log.read(fr.seg, fr.pos + start, stop - start)
        except LogDamage as damage:
            log.error("volume %s: inode %d: %s", self.name, inode.ino, damage)
            raise DataDamaged(str(damage)) from None
        bad = frame.bad_blocks(buf, first, fr.sums)
        if bad:
            block = bad[0]
            log.error(
                "volume %s: inode %d: data block %d of the chunk at segment %d offset %d "
                "(file offset %d) fails its checksum",
                self.name,
                inode.ino,
                block,
                fr.seg,
                fr.pos,
                offset - skip + block * frame.BLOCK_SIZE,
            )
            raise DataDamaged(f"inode {inode.ino} chunk at segment {fr.seg} offset {fr.pos}")
        if start == skip and len(buf) == length:
            return buf
        return buf[skip - start : skip - start + length]

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
        """Write the whole state as a checkpoint, now, so replay starts from the log's end."""
        self.wait_checkpoint()
        plan = self._plan_checkpoint(self.log.sync())
        journal.write_checkpoint(self._dir_fd, self._state_records(plan.end))
        self._finish_checkpoint(plan)

    def fork_checkpoint(self) -> int:
        """Start writing a checkpoint in a child process; return the child's pid.

        The child writes from a copy-on-write image of this process's memory, so it sees the
        state exactly as it is now while this process goes on serving requests: a checkpoint
        of a million files takes seconds, and the mount would stand still meanwhile.  Once
        the child has ended, `wait_checkpoint` reaps it and completes the checkpoint (the
        volume alone reaps it: `checkpoint` and `close` wait for it too).  The child holds
        the volume's lock while it lives and is killed if this process dies, so no later
        server can meet it writing.
        """
        self.wait_checkpoint()
        plan = self._plan_checkpoint(self.log.head)
        pid = os.fork()
        if pid == 0:  # the child: never returns to the caller
            code = 1
            try:
                gc.disable()  # a collection would only copy pages the parent still shares
                _detach_from_parent(plan.parent)
                # The log the checkpoint points into must be durable before it is; flushing
                # it here spares the server a wait of up to CHECKPOINT_AFTER bytes of writeback.
                try:
                    self.log.flush()
                except OSError:
                    # The kernel reported the writeback error to this process only: the
                    # server must learn it from the exit code (see `SegmentLog.fail`).
                    code = _FLUSH_FAILED
                    raise
                journal.write_checkpoint(self._dir_fd, self._state_records(plan.end))
                code = 0
            except BaseException:
                log.exception("volume %s: writing a checkpoint failed", self.name)
            finally:
                os._exit(code)
        self._forked = (pid, plan)
        return pid

    def end_checkpoint(self, status: int) -> bool:
        """Complete the forked checkpoint whose child ended with wait status *status*;
        return whether it was written."""
        pid, plan = self._forked
        self._forked = None
        code = os.waitstatus_to_exitcode(status)
        if code == _FLUSH_FAILED:
            self.log.fail(OSError(errno.EIO, f"checkpoint writer {pid} could not flush the log"))
        if code != 0:
            log.error("volume %s: checkpoint writer %d failed (exit code %d)", self.name, pid, code)
            return False
        self._finish_checkpoint(plan)
        return True

    def wait_checkpoint(self) -> bool:
        """Wait for a forked checkpoint to end and complete it; return whether it was
        written (True if none was running: whoever waited for it has completed it)."""
        if self._forked is None:
            return True
        _, status = os.waitpid(self._forked[0], 0)
        return self.end_checkpoint(status)

    @property
    def checkpoint_running(self) -> bool:
        return self._forked is not None

    def _plan_checkpoint(self, end: Position) -> _CheckpointPlan:
        """What a checkpoint of the state now, covering the log up to *end*, changes."""
        # Sealed segments no file uses now are not referenced by a checkpoint of this state,
        # and no later change puts data into a sealed segment.
        dead = [s for s in self.log.segments if s < end.seg and self.live.get(s, 0) == 0]
        return _CheckpointPlan(end, dead, self._appended_since_checkpoint, os.getpid())

    def _finish_checkpoint(self, plan: _CheckpointPlan) -> None:
        """Take a checkpoint of the state at *plan.end*, now on disk, as the new start."""
        self._checkpoint_size = os.stat(journal.CHECKPOINT_FILE, dir_fd=self._dir_fd).st_size
        self.checkpoint_at = plan.end
        self._appended_since_checkpoint -= plan.appended
        for seg in plan.dead:
            self.log.remove_segment(seg)
            self.live.pop(seg, None)
            self.extents_in.pop(seg, None)
            self._punched.pop(seg, None)
        self.log.sync_names()

    def _state_records(self, end: Position) -> Iterator[list]:
        yield [CHECKPOINT, FORMAT, end.seg, end.pos, self.next_ino]
        for inode in self.inodes.values():
            yield inode.record()
            if inode.xattrs:
                for name, value in inode.xattrs.items():
                    yield [XATTR, inode.ino, name, value]
            if inode.extents:
                yield [
                    EXTENTS,
                    inode.ino,
                    [
                        [e.start, e.length, e.skip, *e.frame[:3], list(e.frame.sums)]
                        for e in inode.extents
                    ],
                ]
        for inode in self.inodes.values():
            if inode.entries is not None:
                for name, ino in inode.entries.items():
                    yield [LINK, inode.ino, name, ino]

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
                    log.warning(
                        "volume %s: no checkpoint at close (%s); the next mount replays the log",
                        self.name,
                        exc,
                    )
        finally:
            if self._forked is not None:  # as if killed: its writer dies with it
                os.kill(self._forked[0], signal.SIGKILL)
                os.waitpid(self._forked[0], 0)
                self._forked = None
            self.log.close()
            os.close(self._dir_fd)
            os.close(self._lock_fd)

    # -- compaction -------------------------------------------------------------------------

    def compaction_victim(self, min_garbage: int = COMPACT_MIN_GARBAGE) -> int | None:
        """The sealed segment most worth compacting, if the log holds enough garbage.

        Garbage is allowed to grow to the size of the live data (and at least *min_garbage*),
        so compaction costs at most one extra write of each live byte per such growth.
        """
        sizes = self.log.sizes()
        if self.quota:  # keeps housekeeping well ahead of `log_limit`
            live = self.live_cost
            min_garbage = min(min_garbage, self.log.segment_size)
        else:
            live = self.used
        if sum(sizes.values()) - live < max(min_garbage, live):
            return None
        return self._victim(sizes)

    def _victim(self, sizes: dict[int, int]) -> int | None:
        """The sealed segment whose live data is the smallest part of it, if at most half.

        A sized volume measures live data by what moving it appends (`segment_cost`), as
        the bound of its disk use needs: a segment of small extents frees less when moved,
        as each extent takes a frame of its own.
        """
        candidates = [
            s for s in sizes if s != self.log.head.seg and s not in self._unmovable and sizes[s]
        ]
        if not candidates:
            return None
        live = self.segment_cost if self.quota else lambda s: self.live.get(s, 0)
        seg = min(candidates, key=lambda s: live(s) / sizes[s])
        return seg if live(seg) <= sizes[seg] // 2 else None

    def _live_extents(self) -> dict[int, list[tuple[int, Extent]]]:
        """(ino, extent) of every extent in use, by the segment its data lies in."""
        by_segment: dict[int, list[tuple[int, Extent]]] = {}
        for inode in self.inodes.values():
            if inode.extents:
                for ext in inode.extents:
                    by_segment.setdefault(ext.frame.seg, []).append((inode.ino, ext))
        return by_segment

    def live_ranges(self) -> dict[int, list[tuple[int, int, int]]]:
        """(ino, start, length) of every extent in use, by the segment its data lies in; every
        segment of the log has an entry.  One scan of the whole volume (0.3 s at 1M files):
        compaction takes one per round, not one per segment."""
        ranges: dict[int, list[tuple[int, int, int]]] = {seg: [] for seg in self.log.segments}
        for seg, extents in self._live_extents().items():
            ranges[seg] = [(ino, ext.start, ext.length) for ino, ext in extents]
        return ranges

    def relocate(self, ino: int, start: int, length: int, seg: int) -> None:
        """Copy what of [start, start+length) of *ino* still lies in *seg* to the log's head."""
        inode = self.inodes.get(ino)
        if inode is None or inode.extents is None:
            return
        for pos, n, fr, skip in list(inode.extents.pieces(start, start + length)):
            if fr is None or fr.seg != seg:
                continue
            try:
                data = self._read_frame(inode, pos, fr, skip, n)
            except DataDamaged:
                self._unmovable.add(seg)  # keep it: reads must go on reporting the damage
                continue
            self.commit([[WRITE, ino, pos, n, frame.block_sums(data), None]], data, compacting=True)

    # -- giving space back -------------------------------------------------------------------

    def reclaimable(self) -> int:
        """Bytes of dead data in the log that still take disk space (not yet punched)."""
        sizes = self.log.sizes()
        return sum(
            max(0, size - self.live.get(seg, 0) - self._punched.get(seg, 0))
            for seg, size in sizes.items()
        )

    @property
    def reclaim_due(self) -> bool:
        """Whether the disk is nearly full while dead data could give space back."""
        disk = self.disk_stats()
        return (
            disk.f_bavail * disk.f_frsize < RECLAIM_FREE_BELOW and self.reclaimable() >= RECLAIM_MIN
        )

    def reclaim(self) -> int:
        """Give the disk space of every byte no file uses back to the file system, now.

        Compaction frees space by copying, and only once garbage is plentiful; this punches
        holes in place.  A checkpoint comes first: replay never reads the log before it, so
        every byte there outside a live extent may go (headers of dead frames too).  If the
        disk is too full for the checkpoint, the reserve file makes room for it.  Returns
        the bytes punched.
        """
        try:
            self.checkpoint()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            self._drop_reserve()
            self.checkpoint()
        end = self.checkpoint_at
        live = self._live_extents()
        sizes = self.log.sizes()
        freed = 0
        for seg in [s for s in self.log.segments if s <= end.seg]:
            limit = end.pos if seg == end.seg else sizes[seg]
            starts = [(e.frame.pos + e.skip, e.length) for _, e in live.get(seg, ())]
            used = sorted((first, first + length) for first, length in starts)
            pos = 0
            for first, stop in [*used, (limit, limit)]:
                if first > pos:
                    freed += self.log.punch(seg, pos, min(first, limit))
                pos = max(pos, stop)
                if pos >= limit:
                    break
            self._punched[seg] = sizes[seg] - self.live.get(seg, 0)
        self._keep_reserve()
        log.info("volume %s: gave %d bytes of dead data back to the disk", self.name, freed)
        return freed

    def _keep_reserve(self) -> None:
        """Make sure the reserve file exists (best effort: not on a full disk)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(RESERVE_FILE, flags, 0o600, dir_fd=self._dir_fd)
        except OSError:
            return
        want = self.reserve_size
        try:
            size = os.fstat(fd).st_size
            if size < want:
                os.posix_fallocate(fd, 0, want)
            elif size > want:
                os.ftruncate(fd, want)
        except OSError:  # a part of it would only take space without being sure of room
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)

    @property
    def reserve_size(self) -> int:
        """The reserve must hold a checkpoint; a sized volume's is no larger than its size
        (`INODE_COST`), so a small volume needs no 8 MiB of it."""
        if self.quota:
            return min(RESERVE_SIZE, self.quota + RESERVE_SIZE // 8)
        return RESERVE_SIZE

    def _drop_reserve(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(RESERVE_FILE, dir_fd=self._dir_fd)
        log.warning("volume %s: the disk is full; using the reserve", self.name)

    # -- limits ---------------------------------------------------------------------------

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
            raise StoreError(f"volume {self.name}: sizes and inode limits cannot be negative")
        if size and size < self.used_by_files:
            raise StoreError(
                f"volume {self.name} holds {self.used_by_files} bytes: "
                f"it cannot be made smaller than that ({size})"
            )
        if inodes and inodes < self.inodes_used:
            raise StoreError(
                f"volume {self.name} has {self.inodes_used} inodes: "
                f"its inode limit cannot be lower than that ({inodes})"
            )
        segment_size = min(self.log.segment_size, segment_size_for(size))
        header = {**self.header, "size": size, "inodes": inodes, "segment_size": segment_size}
        if segment_size < self.log.segment_size:
            self.sync()
        journal.write_durably(self._dir_fd, "volume", b"".join(frame.encode(header)))
        self.header = header
        self.quota, self.inode_limit = size, inodes
        self.log.segment_size = segment_size
        self._keep_reserve()
        log.info("volume %s: size %d, inode limit %d", self.name, size, inodes)

    # -- figures --------------------------------------------------------------------------

    def disk_stats(self) -> os.statvfs_result:
        """Capacity figures of the file system that holds the store."""
        return os.statvfs(self._dir_fd)

    def save_usage(self) -> None:
        """Write the usage figures for `volfsd ls` if they changed (no fsync: advisory)."""
        usage = {"used": self.used_by_files, "inodes": self.inodes_used}
        if usage == self._saved_usage:
            return
        tmp = USAGE_FILE + ".tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600, dir_fd=self._dir_fd)
        try:
            os.write(fd, b"".join(frame.encode(usage)))
        finally:
            os.close(fd)
        os.rename(tmp, USAGE_FILE, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        self._saved_usage = usage
