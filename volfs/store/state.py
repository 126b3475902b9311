"""A volume's state as replay builds it: inodes, directories, extent maps and the accounting.

`VolumeState` is what both a served volume (`volfs.store.volume.Volume`, which adds the
journaled writing methods) and a read-only load for checking
(`volfs.store.readonly.ReadOnlyState`) are built on.  It has no method that writes to the
store: it reads the checkpoint and the log through a `SegmentReader`, applies their records to
memory, and reads verified file data.  Anything that appends, syncs, cuts or deletes lives in
the writing volume, so a read-only load cannot reach it.

Each record kind is applied by a function of its own (`_APPLY`), the same code for replay and
for a served volume's own changes: the state after a crash is exactly the state built from
the frames that reached the store.
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn

from volfs.errors import DataDamaged, VolumeDamaged
from volfs.store import frame, headers, journal, naming, records
from volfs.store.extents import ExtentMap, FrameData, Removed, extents_of
from volfs.store.log import LogDamage, LogFrame, Position, SegmentReader
from volfs.store.records import (
    CheckpointRecord,
    ExchangeRecord,
    ExtentsRecord,
    InodeRecord,
    LinkRecord,
    Record,
    RenameRecord,
    UnlinkRecord,
    WriteRecord,
    XattrRecord,
)

logger = logging.getLogger(__name__)

ROOT_INO = 1

#: What a volume's size is charged with besides the bytes of file data (ARCHITECTURE.md,
#: "Quota").  Each is at least what the store keeps of the item for good (its checkpoint
#: record; for an extent also the frame compaction would copy it into), so what a volume
#: holds, metadata included, stays within its size and its disk use within a bound of it.
INODE_COST = 128  #: each inode but the root directory (plus a symlink's target bytes)
ENTRY_COST = 32  #: each directory entry, plus its name's bytes
XATTR_COST = 32  #: each extended attribute, plus its name's and value's bytes
EXTENT_COST = 256  #: each extent (a piece of a file stored by one write), plus its bytes


class SegmentMissing(DataDamaged):
    """File data lies in a log segment whose file is gone; the FUSE layer answers EIO."""

    def __init__(self, seg: int, message: str, ino: int, start: int, end: int) -> None:
        super().__init__(message, ino, start, end)
        self.seg = seg


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

    def record(
        self,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        ctime_ns: int | None = None,
    ) -> InodeRecord:
        """The INODE record that sets this inode's attributes as they are, but for those
        given (one call, no copy: every operation journals one or more of these)."""
        return records.make(
            InodeRecord,
            (
                self.ino,
                self.mode if mode is None else mode,
                self.uid if uid is None else uid,
                self.gid if gid is None else gid,
                self.rdev,
                self.size if size is None else size,
                self.atime_ns if atime_ns is None else atime_ns,
                self.mtime_ns if mtime_ns is None else mtime_ns,
                self.ctime_ns if ctime_ns is None else ctime_ns,
                self.target,
            ),
        )


def new_root(header: Mapping[str, Any]) -> Inode:
    """The root directory of a new volume (no times yet): owner and mode as its *header*
    says (`headers.root_attrs`)."""
    uid, gid, mode = headers.root_attrs(header)
    root = Inode(ROOT_INO, stat.S_IFDIR | mode)
    root.uid, root.gid = uid, gid
    return root


def dir_entries(inode: Inode) -> dict[bytes, int]:
    """A directory's entries; TypeError for another inode (a record that does not fit)."""
    if inode.entries is None:
        raise TypeError(f"inode {inode.ino} is not a directory")
    return inode.entries


def _extents(inode: Inode) -> ExtentMap:
    """A regular file's extent map; TypeError for another inode."""
    if inode.extents is None:
        raise TypeError(f"inode {inode.ino} is not a regular file")
    return inode.extents


class VolumeState:
    """The state of one volume, built from its checkpoint and log; reads, never writes."""

    log: SegmentReader

    def __init__(self, name: str, dir_fd: int, log: SegmentReader) -> None:
        self.name = name
        self.dir_fd = dir_fd
        self.log = log
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

    # -- loading ----------------------------------------------------------------------------

    def load_state(self) -> Position:
        """Rebuild the state from the checkpoint and the log after it; return the log's end."""
        start = Position(0, 0)
        try:
            stored = journal.read_checkpoint(self.dir_fd)
            for raw in stored or ():
                if raw[0] == records.CHECKPOINT:
                    covers = records.decode(raw)
                    assert type(covers) is CheckpointRecord
                    start = Position(covers.segment, covers.offset)
                    self.next_ino = covers.next_ino
                else:
                    self._apply_stored(raw, 0, 0)
        except (journal.CheckpointDamage, LookupError, TypeError, ValueError) as exc:
            raise VolumeDamaged(f"volume {self.name}: checkpoint is damaged: {exc}") from None
        self.checkpoint_at = start
        return self._replay(start)

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
                    if not isinstance(lf.meta, list):
                        raise TypeError(f"meta part is not a list: {lf.meta!r}")
                    for raw in lf.meta:
                        self._apply_stored(raw, lf.at.seg, lf.data_pos)
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

    def _data_intact(self, lf: LogFrame) -> bool:
        meta: Any = lf.meta
        write = next((r for r in meta if r[0] == records.WRITE), None)
        known = records.fields_of(write)
        if known is None or known[1].get("length") != lf.data_len:
            return False
        data = self.log.read(lf.at.seg, lf.data_pos, lf.data_len)
        return not frame.bad_blocks(data, 0, known[1].get("block_sums") or [])

    def _cut_tail(self, at: Position, reason: str) -> None:
        """What to do with a torn tail found at *at*; the writing volume cuts it off."""
        raise NotImplementedError

    # -- applying records (live and replay) -------------------------------------------------

    def _apply_stored(self, raw: Any, seg: int, data_pos: int) -> None:
        """Apply a record as read from the store: a list, its kind first, then the fields of
        its record class (`volfs.store.records`); ValueError for another kind."""
        try:
            applier = _APPLY_STORED[raw[0]]
        except (LookupError, TypeError):  # not a list, empty, or not a kind replay applies
            raise ValueError(f"not a record replay applies: {raw!r}") from None
        applier(self, raw[1:], seg, data_pos)

    def apply(self, items: Iterable[Record], seg: int, data_pos: int) -> None:
        """Apply records to memory; *seg* and *data_pos* say where their frame's data is."""
        for record in items:
            try:
                applier = _APPLY[type(record)]
            except KeyError:
                kind = records.KIND_OF[type(record)]
                raise ValueError(f"record kind {kind} cannot be applied") from None
            applier(self, record, seg, data_pos)

    @staticmethod
    def _unlinked(parent: Inode, child: Inode) -> None:
        """Count *child*'s link from *parent* as gone."""
        if child.entries is not None:
            parent.nlink -= 1
            child.nlink = 0
        else:
            child.nlink -= 1

    def _put(
        self, inode: Inode, offset: int, fr: FrameData, length: int = -1, skip: int = 0
    ) -> None:
        if length < 0:
            length = fr.length
        inode.stored += length - self._release(_extents(inode).put(offset, length, fr, skip))
        self.live[fr.seg] = self.live.get(fr.seg, 0) + length
        self.used += length
        added = extents_of(offset, length)
        self.extents_in[fr.seg] = self.extents_in.get(fr.seg, 0) + added
        self.extent_count += added

    def _release(self, pieces: Removed) -> int:
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

    def _free_unlinked(self) -> None:
        """Drop inodes no entry names: open but unlinked when the volume went down."""
        for inode in [i for i in self.inodes.values() if i.nlink == 0]:
            self._free(inode)

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

    def recount(self) -> dict[str, Any]:
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

    # -- reading ----------------------------------------------------------------------------

    def seek(self, inode: Inode, offset: int, hole: bool) -> int | None:
        """lseek(2)'s SEEK_DATA (or, with *hole*, SEEK_HOLE) on a regular file: the first
        offset at or after *offset* with data (a hole; the end of the file counts as one);
        None (ENXIO) if there is none or *offset* is at or past the end."""
        if offset >= inode.size:
            return None
        extents = _extents(inode)
        if hole:
            return min(extents.next_hole(offset), inode.size)
        found = extents.next_data(offset)
        return found if found is not None and found < inode.size else None

    def read(self, inode: Inode, offset: int, size: int) -> bytes:
        """Read from a regular file; raises `DataDamaged` rather than return wrong bytes."""
        end = min(offset + size, inode.size)
        if offset >= end:
            return b""
        parts = []
        for piece_offset, length, fr, skip in _extents(inode).pieces(offset, end):
            if fr is None:
                parts.append(bytes(length))
            else:
                parts.append(self._read_frame(inode, piece_offset, fr, skip, length))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def has_xattr(self, name: bytes) -> bool:
        """Whether any inode has the extended attribute *name* (a scan of every inode)."""
        return any(inode.xattrs and name in inode.xattrs for inode in self.inodes.values())

    def _damaged(self, inode: Inode, start: int, end: int, what: str) -> NoReturn:
        naming.log_damage(self, inode.ino, start, end, what)
        raise DataDamaged(what, inode.ino, start, end) from None

    def _read_frame(
        self, inode: Inode, offset: int, fr: FrameData, skip: int, length: int
    ) -> bytes:
        first = skip // frame.BLOCK_SIZE
        start = first * frame.BLOCK_SIZE
        stop = min(fr.length, -(-(skip + length) // frame.BLOCK_SIZE) * frame.BLOCK_SIZE)
        base = offset - skip  # the file offset of the frame's first byte
        try:
            buf = self.log.read(fr.seg, fr.pos + start, stop - start)
        except LogDamage as damage:
            self._damaged(inode, offset, offset + length, str(damage))
        except FileNotFoundError:
            text = f"data in missing segment {fr.seg}"
            naming.log_damage(self, inode.ino, offset, offset + length, text)
            raise SegmentMissing(fr.seg, text, inode.ino, offset, offset + length) from None
        bad = frame.bad_blocks(buf, first, fr.sums)
        if bad:
            block = bad[0]
            at = base + block * frame.BLOCK_SIZE
            end = min(at + frame.BLOCK_SIZE, base + fr.length)
            where = fr.pos + block * frame.BLOCK_SIZE
            self._damaged(inode, at, end, f"the block at segment {fr.seg} offset {where} "
                                          "fails its checksum")  # fmt: skip
        if start == skip and len(buf) == length:
            return buf
        return buf[skip - start : skip - start + length]


# -- one applier per record kind ---------------------------------------------------------------


def _apply_inode(state: VolumeState, record: InodeRecord, _seg: int, _data_pos: int) -> None:
    ino, mode, uid, gid, rdev, size, atime, mtime, ctime, target = record
    inode = state.inodes.get(ino)
    if inode is None:
        inode = state.inodes[ino] = Inode(ino, mode)
        state.next_ino = max(state.next_ino, ino + 1)
        if ino != ROOT_INO:
            state.meta_used += INODE_COST
    elif stat.S_IFMT(mode) != stat.S_IFMT(inode.mode):
        raise ValueError(f"inode {ino} cannot change its type")
    if inode.extents is not None and size < inode.size:
        inode.stored -= state._release(inode.extents.truncate(size))
    inode.mode, inode.uid, inode.gid = _shared(mode), _shared(uid), _shared(gid)
    inode.rdev, inode.size = rdev, size
    # Equal times share one int object (32 bytes each; a volume may hold millions).
    mtime = atime if mtime == atime else mtime
    inode.atime_ns, inode.mtime_ns = atime, mtime
    inode.ctime_ns = mtime if ctime == mtime else ctime
    state.meta_used += len(target or b"") - len(inode.target or b"")
    inode.target = target


def _apply_link(state: VolumeState, record: LinkRecord, _seg: int, _data_pos: int) -> None:
    parent_ino, name, ino = record
    parent, child = state.inodes[parent_ino], state.inodes[ino]
    entries = dir_entries(parent)
    if name in entries:
        raise ValueError(f"entry {name!r} exists in {parent_ino}")
    entries[name] = child.ino  # one int object for both
    state.meta_used += ENTRY_COST + len(name)
    child.nlink += 1
    if child.entries is not None:
        parent.nlink += 1
        child.parent = parent_ino


def _apply_unlink(state: VolumeState, record: UnlinkRecord, _seg: int, _data_pos: int) -> None:
    parent_ino, name = record
    parent = state.inodes[parent_ino]
    state._unlinked(parent, state.inodes[dir_entries(parent).pop(name)])
    state.meta_used -= ENTRY_COST + len(name)


def _apply_rename(state: VolumeState, record: RenameRecord, _seg: int, _data_pos: int) -> None:
    # Onto an existing name, the inode it named loses that link (no UNLINK record comes with it).
    old_parent_ino, old_name, new_parent_ino, new_name = record
    old_parent, new_parent = state.inodes[old_parent_ino], state.inodes[new_parent_ino]
    new_entries = dir_entries(new_parent)
    child = state.inodes[dir_entries(old_parent).pop(old_name)]
    state.meta_used -= ENTRY_COST + len(old_name)
    if new_name in new_entries:
        state._unlinked(new_parent, state.inodes[new_entries[new_name]])
    else:
        state.meta_used += ENTRY_COST + len(new_name)
    new_entries[new_name] = child.ino
    if child.entries is not None:
        old_parent.nlink -= 1
        new_parent.nlink += 1
        child.parent = new_parent_ino


def _apply_exchange(state: VolumeState, record: ExchangeRecord, _seg: int, _data_pos: int) -> None:
    parent_a_ino, name_a, parent_b_ino, name_b = record
    parent_a, parent_b = state.inodes[parent_a_ino], state.inodes[parent_b_ino]
    entries_a, entries_b = dir_entries(parent_a), dir_entries(parent_b)
    a = state.inodes[entries_a[name_a]]
    b = state.inodes[entries_b[name_b]]
    entries_a[name_a], entries_b[name_b] = b.ino, a.ino
    for child, old, new in ((a, parent_a, parent_b), (b, parent_b, parent_a)):
        if child.entries is not None:
            old.nlink -= 1
            new.nlink += 1
            child.parent = new.ino


def _apply_write(state: VolumeState, record: WriteRecord, seg: int, data_pos: int) -> None:
    ino, offset, length, block_sums, mtime_ns = record
    inode = state.inodes[ino]
    state._put(inode, offset, FrameData(seg, data_pos, length, tuple(block_sums)))
    if mtime_ns is not None:
        inode.size = max(inode.size, offset + length)
        inode.mtime_ns = inode.ctime_ns = mtime_ns


def _apply_xattr(state: VolumeState, record: XattrRecord, _seg: int, _data_pos: int) -> None:
    ino, name, value = record
    inode = state.inodes[ino]
    old = None if inode.xattrs is None else inode.xattrs.get(name)
    if old is not None:
        state.meta_used -= XATTR_COST + len(name) + len(old)
    if value is not None:
        if inode.xattrs is None:
            inode.xattrs = {}
        inode.xattrs[name] = value
        state.meta_used += XATTR_COST + len(name) + len(value)
    elif inode.xattrs is not None:
        inode.xattrs.pop(name, None)


def _apply_extents(state: VolumeState, record: ExtentsRecord, _seg: int, _data_pos: int) -> None:
    ino, extents = record
    inode = state.inodes[ino]
    for start, length, skip, eseg, epos, flen, sums in extents:
        state._put(inode, start, FrameData(eseg, epos, flen, tuple(sums)), length, skip)


_Applier = Callable[[VolumeState, Any, int, int], None]
#: The applier of each record class (CHECKPOINT only says where replay starts).  Each reads its
#: record's fields by unpacking them in the record class's order, so it takes a record or the
#: fields of a stored list alike: replay hands it ``raw[1:]`` (`_APPLY_STORED`) and never builds
#: a record tuple, which made loading a checkpoint of 100k files 1.65x slower.
_APPLY: dict[type[Record], _Applier] = {
    InodeRecord: _apply_inode,
    LinkRecord: _apply_link,
    UnlinkRecord: _apply_unlink,
    RenameRecord: _apply_rename,
    ExchangeRecord: _apply_exchange,
    WriteRecord: _apply_write,
    XattrRecord: _apply_xattr,
    ExtentsRecord: _apply_extents,
}
#: The applier of each record kind, for records as stored.
_APPLY_STORED: dict[int, _Applier] = {records.KIND_OF[cls]: f for cls, f in _APPLY.items()}
