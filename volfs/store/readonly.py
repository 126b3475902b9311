"""A volume's state loaded read-only from its store directory, for checking and exporting.

A read-only state is loaded without the volume's lock, so a served volume can be checked too
(`volfsd scrub`).  It never writes, truncates or cuts anything, by construction: `ReadOnlyState` is
a `VolumeState` (no writing method) over a `ReadOnlyLog` (a `SegmentReader` opening segments
read-only); where a mount would cut a torn tail, a read-only load stops replaying and notes it.

Log segments are append-only and never rewritten, so what such a load has read stays valid
while the server appends.  What the server may do meanwhile is write a new checkpoint and then
delete the segments compaction emptied.  A read-only load keeps the checkpoint file it loaded
open and so can tell that apart from damage: a segment that vanishes once a newer checkpoint
has replaced the loaded one was compacted away (the compactor verified its live data as it
moved it); a segment that vanishes while the checkpoint stays is missing.

Loading verifies every checkpoint and log frame it replays.  Damage there is recorded with its
place (`Damage`), and with its meta part read without its checksum (to name files, never to
build state); loading goes on after it where the next frame can be found.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import msgpack

from volfs.errors import ErrorCode, StoreError, VolumeDamaged
from volfs.store import frame, headers, journal, records
from volfs.store.log import (
    MAX_OPEN_SEGMENTS,
    OPEN_FLAGS,
    LogDamage,
    LogFrame,
    Position,
    SegmentReader,
    segment_name,
)
from volfs.store.records import CheckpointRecord, LinkRecord
from volfs.store.state import ROOT_INO, VolumeState, new_root

#: Loads tried while the server keeps replacing the checkpoint under a read-only load
#: (the last one keeps the part of the log it could replay).
LOAD_ATTEMPTS = 8
Pace = Callable[[int], None]
#: For each record kind that concerns one inode, the field that names it (a directory, for
#: UNLINK, RENAME and EXCHANGE).  LINK names two and is read apart.
_ABOUT_INODE = {
    records.InodeRecord: "ino",
    records.WriteRecord: "ino",
    records.XattrRecord: "ino",
    records.ExtentsRecord: "ino",
    records.UnlinkRecord: "parent",
    records.RenameRecord: "old_parent",
    records.ExchangeRecord: "parent_a",
}


class Damage(NamedTuple):
    """Metadata that failed its checks while loading read-only: a frame, or a whole segment."""

    what: str  #: where it is and why it is damaged
    records: object  #: its meta part read without its checksum; None if unreadable
    missing: int | None = None  #: the segment, if its file is missing


class SegmentGone(Exception):
    def __init__(self, seg: int) -> None:
        super().__init__(f"segment {seg} is gone")
        self.seg = seg


class CheckpointMoved(Exception):
    """The server replaced the checkpoint while a read-only state loaded from it: load again."""


def _open_ro(name: str, dir_fd: int) -> int:
    try:  # O_NOATIME: a check leaves even the access times of the store as they were
        return os.open(name, os.O_RDONLY | OPEN_FLAGS | os.O_NOATIME, dir_fd=dir_fd)
    except PermissionError:  # O_NOATIME is allowed to the file's owner (and root) only
        return os.open(name, os.O_RDONLY | OPEN_FLAGS, dir_fd=dir_fd)


def _frame_at(fd: int, pos: int) -> tuple[object, int, int]:
    """The verified meta part of the frame at *pos*, its data length and the frame's length."""
    header = os.pread(fd, frame.HEADER.size, pos)
    meta_len, data_len, _ = frame.decode_header(header)
    meta = frame.decode_meta(header, os.pread(fd, meta_len, pos + frame.HEADER.size))
    return meta, data_len, frame.HEADER.size + meta_len + data_len


def _salvage(fd: int, pos: int) -> tuple[int | None, object]:
    """After a damaged frame at *pos*: where the next frame starts, if the damaged frame's
    lengths lead to one that verifies (or to the end), and the damaged frame's meta part
    decoded without its checksum (None if that fails)."""
    size = os.fstat(fd).st_size
    header = os.pread(fd, frame.HEADER.size, pos)
    if len(header) < frame.HEADER.size:
        return None, None
    meta_len, data_len, _ = frame.HEADER.unpack(header)
    records = None
    if 0 < meta_len <= min(frame.MAX_META, size - pos - frame.HEADER.size):
        with contextlib.suppress(Exception):  # msgpack raises many kinds of error on garbage
            raw = os.pread(fd, meta_len, pos + frame.HEADER.size)
            records = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    end = pos + frame.HEADER.size + meta_len + data_len
    if end == size:
        return end, records
    if end < size:
        with contextlib.suppress(frame.FrameError):
            _frame_at(fd, end)
            return end, records
    return None, records


class ReadOnlyLog(SegmentReader):
    """A volume's log as a read-only load reads it: segments opened read-only, nothing cut.

    Replay records damage before the durable mark and goes on after it; at damage beyond the
    mark (a frame still being written, or a torn tail) it stops, as a mount would, but cuts
    nothing.  *pace* is called with the bytes about to be read.
    """

    def __init__(self, dir_fd: int, volume_id: str, pace: Pace, moved: Callable[[], bool]) -> None:
        super().__init__(dir_fd, volume_id, segment_size=0)
        self._pace = pace
        self._moved = moved
        self.mark = Position(0, 0)
        self.damage: list[Damage] = []
        self.tail: tuple[Position, str] | None = None  #: where replay stopped short, and why
        self.retry = True  #: whether a replaced checkpoint makes the load start again
        self.listed_current = False  #: whether the checkpoint was current when listing ended

    def _fd(self, seg: int) -> int:
        fd = self._fds.pop(seg, None)  # re-inserted last: the least recently used goes first
        if fd is None:
            if len(self._fds) >= MAX_OPEN_SEGMENTS:
                os.close(self._fds.pop(next(iter(self._fds))))
            try:
                fd = _open_ro(segment_name(seg), self._dir_fd)
            except FileNotFoundError:
                raise SegmentGone(seg) from None
        self._fds[seg] = fd
        return fd

    def read(self, seg: int, pos: int, length: int) -> bytes:
        self._pace(length)
        return super().read(seg, pos, length)

    def durable_mark(self) -> Position:
        self.mark = super().durable_mark()  # read before any frame: what lies before it is whole
        return self.mark

    def frames(self, start: Position) -> Iterator[LogFrame]:
        # Listed only now, after the checkpoint was read: the segments it needs exist, or were
        # deleted because a newer checkpoint replaced it.  Numbers from the checkpoint's
        # segment to the last one listed (or the durable mark's) are tried even if not listed.
        listed = set(self._list_segments())
        listed.update(range(max(start.seg, 1), max(listed | {self.mark.seg}) + 1))
        self.segments = sorted(listed)
        # With the checkpoint still current once listed, a segment the state needs and the
        # listing lacks is missing; vanishing later, it may have been compacted away.
        self.listed_current = not self._moved()
        if not self.listed_current and self.retry:
            raise CheckpointMoved
        proven = max(start, self.mark)
        at = start
        while True:
            try:
                for lf in super().frames(at):
                    self._pace(lf.data_pos - lf.at.pos)
                    yield lf
                return
            except SegmentGone as gone:
                # Compacted away after a newer checkpoint: load again from that one or, when
                # out of tries, keep what was replayed (any prefix of the log is a state).
                # Otherwise, past the mark: dropped as a torn tail by a mount.
                if self._moved() and self.retry:
                    raise CheckpointMoved from None
                if self._moved() or Position(gone.seg, 0) >= proven:
                    self.tail = (Position(gone.seg, 0), "its segment file went away")
                    return
                missing = f"log segment {gone.seg} is missing"
                self.damage.append(Damage(missing, None, gone.seg))
                at = Position(gone.seg + 1, 0)
            except LogDamage as damage:
                if damage.at >= proven:
                    raise  # unsynced: `_replay` stops there (`ReadOnlyState._cut_tail` notes it)
                seg, pos = damage.at
                after, records = _salvage(self._fd(seg), pos)
                what = f"log frame at segment {seg} offset {pos} fails its checks ({damage.reason})"
                if pos == 0:  # its header: what follows may not even be this volume's
                    after, what = None, f"{what}; the segment is skipped"
                elif after is None:
                    what += "; the rest of the segment cannot be located"
                self.damage.append(Damage(what, records))
                at = Position(seg, after) if after is not None else Position(seg + 1, 0)


def _as_checkpoint(raw: object) -> CheckpointRecord | None:
    """*raw* decoded, if it is a CHECKPOINT record (any other is applied, or found unfit)."""
    if isinstance(raw, list) and raw and raw[0] == records.CHECKPOINT:
        with contextlib.suppress(TypeError, ValueError):
            decoded = records.decode(raw)
            if type(decoded) is CheckpointRecord:
                return decoded
    return None


def _no_pace(_nbytes: int) -> None:
    pass


class ReadOnlyState(VolumeState):
    """A volume's state loaded read-only, without its lock, for checking.

    Built on `VolumeState`, which has no writing method, over a `ReadOnlyLog`, which opens
    segments read-only: nothing reachable from a read-only state writes to the store."""

    log: ReadOnlyLog

    def __init__(
        self, name: str, dir_fd: int, header: dict[str, Any], pace: Pace | None = None
    ) -> None:
        self._pace: Pace = pace or _no_pace
        super().__init__(name, dir_fd, ReadOnlyLog(dir_fd, header["id"], self._pace, self.moved))
        self.header = header
        self.damage = self.log.damage
        self.unfit: list[str] = []  #: records that could not be applied
        self.lost_links: dict[int, tuple[int, bytes]] = {}  #: names of inodes whose records failed
        self.replayed = True
        self._checkpoint_fd: int | None = None

    def load(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._checkpoint_fd = _open_ro(journal.CHECKPOINT_FILE, self.dir_fd)
        start = self._load_checkpoint()
        if start is None:
            self.replayed = False  # where the log continues was in the damaged part
        else:
            self.checkpoint_at = start
            try:
                self._replay(start)
            except SegmentGone as gone:  # read for a frame's data check (rare: fds are kept)
                if not self.moved():
                    missing = f"log segment {gone.seg} is missing"
                    self.damage.append(Damage(missing, None, gone.seg))
                elif self.log.retry:
                    raise CheckpointMoved from None
                else:
                    self.log.tail = (Position(gone.seg, 0), "its segment file went away")
            except VolumeDamaged as exc:  # a frame whose meta part is not a list of records
                self.damage.append(Damage(str(exc), None))
        self._free_unlinked()  # open but unlinked: the server drops them when they close
        if ROOT_INO not in self.inodes:  # never mounted (or its records were lost)
            self.inodes[ROOT_INO] = new_root(self.header)

    def _load_checkpoint(self) -> Position | None:
        """Apply the checkpoint; return the log position it covers (None if that was lost)."""
        fd = self._checkpoint_fd
        if fd is None:
            return Position(0, 0)
        start, pos, size = None, 0, os.fstat(fd).st_size
        while pos < size:
            try:
                batch, data_len, length = _frame_at(fd, pos)
                if data_len or not isinstance(batch, list):
                    raise frame.FrameError("not a list of records")
            except frame.FrameError as exc:
                after, garbled = _salvage(fd, pos)
                what = f"checkpoint frame at offset {pos} fails its checks ({exc})"
                self.damage.append(Damage(what, garbled))
                if after is None:
                    break
                pos = after
                continue
            self._pace(length)
            for raw in batch:
                covers = _as_checkpoint(raw)
                if covers is not None:
                    start = Position(covers.segment, covers.offset)
                    self.next_ino = covers.next_ino
                else:
                    self._apply_stored(raw, 0, 0)
            pos += length
        return start if start is not None or not self.damage else None

    def _apply_stored(self, raw: object, seg: int, data_pos: int) -> None:
        try:
            super()._apply_stored(raw, seg, data_pos)
        except (LookupError, TypeError, ValueError) as exc:
            where = f"the log at segment {seg} (data offset {data_pos})" if seg else "a checkpoint"
            self.unfit.append(f"a record in {where}: {exc!r}")
            self.lost_links.update(concerned_inodes([raw])[1])

    def _cut_tail(self, at: Position, reason: str) -> None:
        self.log.tail = (at, reason)  # noted, never cut: the server may be writing there

    def moved(self) -> bool:
        """Whether the checkpoint this state was loaded from has been replaced since."""
        try:
            now = os.stat(journal.CHECKPOINT_FILE, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            if os.fstat(self.dir_fd).st_nlink == 0:
                raise StoreError(
                    f"volume {self.name} was removed during the check", ErrorCode.NOT_FOUND
                ) from None
            return False
        if self._checkpoint_fd is None:
            return True
        held = os.fstat(self._checkpoint_fd)
        return (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino)

    def compacted(self, seg: int) -> bool:
        """Whether segment *seg*, found gone, was deleted by compaction rather than missing:
        the checkpoint has been replaced since loading, and the segment was there when the
        log was listed (or the listing cannot tell, having been outrun by checkpoints)."""
        return self.moved() and (seg in self.log.segments or not self.log.listed_current)

    def data_bytes(self) -> int:
        return sum(inode.stored for inode in self.inodes.values())

    def close(self) -> None:
        self.log.close()
        os.close(self.dir_fd)
        if self._checkpoint_fd is not None:
            os.close(self._checkpoint_fd)
            self._checkpoint_fd = None


def open_readonly(volume_dir: Path, name: str, pace: Pace | None = None) -> ReadOnlyState:
    """Load the state of the volume in *volume_dir*; retried while the checkpoint changes."""
    for attempt in range(LOAD_ATTEMPTS):
        try:
            dir_fd = os.open(volume_dir, os.O_RDONLY | os.O_DIRECTORY | OPEN_FLAGS)
        except FileNotFoundError:
            raise StoreError(f"no such volume: {name}", ErrorCode.NOT_FOUND) from None
        try:
            loaded = ReadOnlyState(name, dir_fd, headers.read_header(name, dir_fd), pace)
            loaded.log.retry = attempt < LOAD_ATTEMPTS - 1
        except FileNotFoundError:
            os.close(dir_fd)
            raise StoreError(f"no such volume: {name}", ErrorCode.NOT_FOUND) from None
        except BaseException:
            os.close(dir_fd)
            raise
        try:
            loaded.load()
            return loaded
        except CheckpointMoved:
            loaded.close()
            time.sleep(0.02 * 2**attempt)
        except BaseException:
            loaded.close()
            raise
    raise AssertionError("the last attempt settles for what it could load")


def concerned_inodes(garbled: object) -> tuple[set[int], dict[int, tuple[int, bytes]]]:
    """The inodes records (maybe garbled) concern, and the names their LINK records give."""
    inos: set[int] = set()
    links: dict[int, tuple[int, bytes]] = {}
    for raw in garbled if isinstance(garbled, list) else ():
        known = records.fields_of(raw)
        if known is None or not isinstance(raw, list) or len(raw) < 2:
            continue
        cls, fields = known
        if not isinstance(fields[cls._fields[0]], int):
            continue
        if cls is LinkRecord and len(raw) == 4 and isinstance(fields["ino"], int):
            inos.add(fields["ino"])
            if isinstance(fields["name"], bytes):
                links[fields["ino"]] = (fields["parent"], fields["name"])
        elif cls in _ABOUT_INODE:
            inos.add(fields[_ABOUT_INODE[cls]])
    return inos, links
