"""Checking a volume: what `volfsd fsck` and `volfsd scrub` report.

Both work on a *snapshot*: the volume's state loaded read-only from its store directory, without
the volume's lock, so a served volume can be checked too.  A snapshot never writes, truncates or
cuts anything: where a mount would cut a torn tail, a snapshot stops replaying and notes it.

Log segments are append-only and never rewritten, so what a snapshot has read stays valid while
the server appends.  What the server may do meanwhile is write a new checkpoint and then delete
the segments compaction emptied.  A snapshot keeps the checkpoint file it loaded open and so can
tell that apart from damage: a segment that vanishes once a newer checkpoint has replaced the
loaded one was compacted away (the compactor verified its live data as it moved it); a segment
that vanishes while the checkpoint stays is missing.

Loading verifies every checkpoint and log frame it replays.  Damage there is recorded with its
place, and with the inodes the damaged frame seems to concern (its meta part read without its
checksum, to name files, never to build state); loading goes on after it where the next frame
can be found.  `check` then verifies every block of live data and, when the metadata is whole,
the directory tree against the inodes, link counts, sizes and the per-segment accounting.
"""

from __future__ import annotations

import contextlib
import enum
import os
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import msgpack

from volfs.errors import StoreError, VolumeDamaged
from volfs.store import frame, headers, journal, records
from volfs.store.extents import Extent
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
from volfs.store.state import ROOT_INO, Inode, VolumeState
from volfs.store.volume import Volume

#: Loads tried while the server keeps replacing the checkpoint under a loading snapshot
#: (the last one keeps the part of the log it could replay).
SNAPSHOT_ATTEMPTS = 8
#: Files named, at most, for one damaged frame (a checkpoint frame holds 4096 records).
MAX_NAMED = 20

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


class ProblemKind(enum.StrEnum):
    """What is wrong; what `--repair` and programs decide on (the text is for people)."""

    CHECKSUM = "checksum"  #: file data fails its checksums
    MISSING_SEGMENT = "missing-segment"  #: a log segment that data or metadata needs is gone
    METADATA = "metadata"  #: a checkpoint or log frame of metadata fails its checks
    UNFIT_RECORD = "unfit-record"  #: records that do not fit the volume's state
    UNREACHABLE = "unreachable"  #: an inode that no directory reaches (an orphan)
    LINK_COUNT = "link-count"  #: a link count that differs from the tree
    PARENT = "parent"  #: a directory whose parent link is wrong
    SIZE = "size"  #: a size that does not fit the data (a symlink's, data past the end)
    ACCOUNTING = "accounting"  #: the per-segment or volume-wide figures differ from a recount


class Problem(NamedTuple):
    path: str  #: the file it concerns, or "inode N", or "(store)"
    what: str  #: what is wrong, for people
    kind: ProblemKind
    ino: int | None = None  #: the inode it concerns, if one


class Report(NamedTuple):
    problems: list[Problem]
    verified: int  #: bytes of live data whose blocks were verified
    moved: int  #: bytes of live data compaction moved away before they could be read
    notes: list[str]


class Damage(NamedTuple):
    """A frame of metadata that failed its checks while a snapshot loaded."""

    kind: ProblemKind
    what: str  #: where it is and why it is damaged
    records: object  #: its meta part read without its checksum; None if unreadable


class SegmentGone(Exception):
    def __init__(self, seg: int) -> None:
        super().__init__(f"segment {seg} is gone")
        self.seg = seg


class CheckpointMoved(Exception):
    """The server replaced the checkpoint while a snapshot loaded from it: load again."""


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
    """A volume's log as a snapshot reads it: segments opened read-only, nothing written or cut.

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
        self.retry = True  #: whether a replaced checkpoint makes the snapshot load again
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
                self.damage.append(Damage(ProblemKind.MISSING_SEGMENT, missing, None))
                at = Position(gone.seg + 1, 0)
            except LogDamage as damage:
                if damage.at >= proven:
                    raise  # unsynced: `_replay` stops there (`Snapshot._cut_tail` notes it)
                seg, pos = damage.at
                after, records = _salvage(self._fd(seg), pos)
                what = f"log frame at segment {seg} offset {pos} fails its checks ({damage.reason})"
                if pos == 0:  # its header: what follows may not even be this volume's
                    after, what = None, f"{what}; the segment is skipped"
                elif after is None:
                    what += "; the rest of the segment cannot be located"
                self.damage.append(Damage(ProblemKind.METADATA, what, records))
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


class Snapshot(VolumeState):
    """A volume's state loaded read-only, without its lock, for checking.

    Built on `VolumeState`, which has no writing method, over a `ReadOnlyLog`, which opens
    segments read-only: nothing reachable from a snapshot writes to the store."""

    log: ReadOnlyLog

    def __init__(
        self, name: str, dir_fd: int, header: dict[str, Any], pace: Pace | None = None
    ) -> None:
        self._pace: Pace = pace or _no_pace
        super().__init__(name, dir_fd, ReadOnlyLog(dir_fd, header["id"], self._pace, self.moved))
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
                    self.damage.append(Damage(ProblemKind.MISSING_SEGMENT, missing, None))
                elif self.log.retry:
                    raise CheckpointMoved from None
                else:
                    self.log.tail = (Position(gone.seg, 0), "its segment file went away")
            except VolumeDamaged as exc:  # a frame whose meta part is not a list of records
                self.damage.append(Damage(ProblemKind.METADATA, str(exc), None))
        self._free_unlinked()  # open but unlinked: the server drops them when they close
        if ROOT_INO not in self.inodes:  # never mounted (or its records were lost)
            self.inodes[ROOT_INO] = Inode(ROOT_INO, stat.S_IFDIR | 0o755)

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
                self.damage.append(Damage(ProblemKind.METADATA, what, garbled))
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
            self.lost_links.update(_about([raw])[1])

    def _cut_tail(self, at: Position, reason: str) -> None:
        self.log.tail = (at, reason)  # noted, never cut: the server may be writing there

    def moved(self) -> bool:
        """Whether the checkpoint this snapshot loaded has been replaced since."""
        try:
            now = os.stat(journal.CHECKPOINT_FILE, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            if os.fstat(self.dir_fd).st_nlink == 0:
                raise StoreError(f"volume {self.name} was removed during the check") from None
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


def open_snapshot(volume_dir: Path, name: str, pace: Pace | None = None) -> Snapshot:
    """Load a snapshot of the volume in *volume_dir*; retried while the checkpoint changes."""
    for attempt in range(SNAPSHOT_ATTEMPTS):
        try:
            dir_fd = os.open(volume_dir, os.O_RDONLY | os.O_DIRECTORY | OPEN_FLAGS)
        except FileNotFoundError:
            raise StoreError(f"no such volume: {name}") from None
        try:
            snapshot = Snapshot(name, dir_fd, headers.read_header(name, dir_fd), pace)
            snapshot.log.retry = attempt < SNAPSHOT_ATTEMPTS - 1
        except FileNotFoundError:
            os.close(dir_fd)
            raise StoreError(f"no such volume: {name}") from None
        except BaseException:
            os.close(dir_fd)
            raise
        try:
            snapshot.load()
            return snapshot
        except CheckpointMoved:
            snapshot.close()
            time.sleep(0.02 * 2**attempt)
        except BaseException:
            snapshot.close()
            raise
    raise AssertionError("the last attempt settles for what it could load")


# -- naming ------------------------------------------------------------------------------------


def _join(prefix: str, name: bytes) -> str:
    return f"{'' if prefix == '/' else prefix}/{name.decode(errors='backslashreplace')}"


def paths_of(volume: VolumeState) -> dict[int, str]:
    """A path for each inode reachable from the root (the first found, for hard links)."""
    paths = {ROOT_INO: "/"}
    pending = [ROOT_INO]
    while pending:
        ino = pending.pop()
        for name, child in volume.inodes[ino].entries.items():
            inode = volume.inodes.get(child)
            if child in paths or inode is None:
                continue
            paths[child] = _join(paths[ino], name)
            if inode.entries is not None:
                pending.append(child)
    return paths


def _about(garbled: object) -> tuple[set[int], dict[int, tuple[int, bytes]]]:
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


def _damage_problems(volume: Snapshot, paths: dict[int, str]) -> list[Problem]:
    """The damage found while loading, each named by the files it concerns where possible."""
    abouts = [_about(d.records) for d in volume.damage]
    links = dict(volume.lost_links)
    for _inos, named in abouts:
        links.update(named)

    def name(ino: int, depth: int = 0) -> str:
        if ino in paths:
            return paths[ino]
        if ino in links and depth < 256:
            parent, entry = links[ino]
            prefix = name(parent, depth + 1)
            if prefix.startswith("/"):
                return _join(prefix, entry)
        return f"inode {ino}"

    problems = []
    for damage, (inos, _links) in zip(volume.damage, abouts, strict=True):
        named = sorted({name(ino): ino for ino in inos}.items())
        if not named:
            what = f"{damage.what}; what it held is unreadable"
            problems.append(Problem("(store)", what, damage.kind))
        for path, ino in named[:MAX_NAMED]:
            problems.append(Problem(path, f"metadata damaged: {damage.what}; the frame names "
                                          "this file (read without its checksum)",
                                    damage.kind, ino))  # fmt: skip
        if len(named) > MAX_NAMED:
            problems.append(Problem("(store)", f"{len(named) - MAX_NAMED} more files are named "
                                               f"in the damaged frame: {damage.what}",
                                    damage.kind))  # fmt: skip
    if volume.unfit:
        problems.append(Problem("(store)", f"{len(volume.unfit)} record(s) do not fit the volume,"
                                           f" the first {volume.unfit[0]}",
                                ProblemKind.UNFIT_RECORD))  # fmt: skip
    return problems


# -- checking ----------------------------------------------------------------------------------


def _tree_problems(volume: VolumeState, paths: dict[int, str]) -> list[Problem]:
    """The tree against the inodes, link counts, sizes, and the per-segment accounting."""
    problems: list[Problem] = []
    links: Counter[int] = Counter()
    subdirs: Counter[int] = Counter()
    for inode in volume.inodes.values():
        for _name, child in inode.entries.items() if inode.entries is not None else ():
            links[child] += 1
            child_inode = volume.inodes.get(child)
            if child_inode is not None and child_inode.entries is not None:
                subdirs[inode.ino] += 1
                if child_inode.parent != inode.ino:
                    problems.append(Problem(paths.get(child, f"inode {child}"),
                                            "directory's parent link is wrong",
                                            ProblemKind.PARENT, child))  # fmt: skip
    live: Counter[int] = Counter()
    for inode in volume.inodes.values():
        where, ino = paths.get(inode.ino, f"inode {inode.ino}"), inode.ino
        if inode.ino not in paths:
            what = "not reachable from the root (orphan)"
            problems.append(Problem(where, what, ProblemKind.UNREACHABLE, ino))
        expected = 2 + subdirs[inode.ino] if inode.entries is not None else links[inode.ino]
        if inode.nlink != expected:
            what = f"link count {inode.nlink}, expected {expected}"
            problems.append(Problem(where, what, ProblemKind.LINK_COUNT, ino))
        if stat.S_ISLNK(inode.mode) and inode.size != len(inode.target or b""):
            what = "symlink size differs from its target"
            problems.append(Problem(where, what, ProblemKind.SIZE, ino))
        for ext in inode.extents or ():
            live[ext.frame.seg] += ext.length
            if ext.start + ext.length > inode.size:
                what = f"data beyond the file size at {ext.start}"
                problems.append(Problem(where, what, ProblemKind.SIZE, ino))
    for seg, used in volume.live.items():
        if used != live.get(seg, 0):
            what = f"segment {seg} accounting {used} != {live[seg]}"
            problems.append(Problem("(store)", what, ProblemKind.ACCOUNTING))
    counted = volume.recount()
    kept = {s: n for s, n in volume.extents_in.items() if n}
    for seg in sorted(set(kept) | set(counted["extents_in"])):
        have, want = kept.get(seg, 0), counted["extents_in"].get(seg, 0)
        if have != want:
            what = f"segment {seg} extent count {have} != {want}"
            problems.append(Problem("(store)", what, ProblemKind.ACCOUNTING))
    for key in ("extent_count", "meta_used", "used"):
        have, want = getattr(volume, key), counted[key]
        if have != want:
            what = f"accounting of {key}: {have} != {want}"
            problems.append(Problem("(store)", what, ProblemKind.ACCOUNTING))
    return problems


def _bad_blocks(volume: VolumeState, ext: Extent) -> list[tuple[int, int, int, int]]:
    """(start, end, segment, offset) of each block of *ext* that fails its checksum: the file
    bytes of the extent in that block, and where the block lies in the log."""
    fr, size = ext.frame, frame.BLOCK_SIZE
    first, last = ext.skip // size, (ext.skip + ext.length - 1) // size
    try:
        length = min(fr.length, (last + 1) * size) - first * size
        bad = frame.bad_blocks(volume.log.read(fr.seg, fr.pos + first * size, length), first,
                               fr.sums)  # fmt: skip
    except (LogDamage, IndexError):  # the segment ends early; fewer sums than blocks
        bad = list(range(first, last + 1))
    base = ext.start - ext.skip  # the file offset of the frame's first byte
    return [
        (max(ext.start, base + b * size), min(ext.start + ext.length, base + (b + 1) * size),
         fr.seg, fr.pos + b * size)
        for b in bad
    ]  # fmt: skip


def _ranges(where: str, ino: int, bad: list[tuple[int, int, int, int]]) -> Iterator[Problem]:
    """One problem per run of adjacent damaged bytes of a file."""
    runs: list[list[int]] = []
    for start, end, seg, pos in sorted(bad):
        if runs and runs[-1][1] == start:
            runs[-1][1] = end
            runs[-1][4] += 1
        else:
            runs.append([start, end, seg, pos, 1])
    for start, end, seg, pos, blocks in runs:
        place = f"segment {seg} offset {pos}"
        place = f"block at {place}" if blocks == 1 else f"{blocks} blocks, the first at {place}"
        what = f"damaged data in bytes {start}-{end} (inode {ino}; {place})"
        yield Problem(where, what, ProblemKind.CHECKSUM, ino)


def check(volume: VolumeState, progress: Callable[[int], None] | None = None) -> list[Problem]:
    """Every problem found in *volume*, a served `Volume` or a `Snapshot`."""
    return examine(volume, progress).problems


def examine(volume: VolumeState, progress: Callable[[int], None] | None = None) -> Report:
    """Check *volume*; *progress* gets the bytes of data done so far."""
    snapshot = volume if isinstance(volume, Snapshot) else None
    paths = paths_of(volume)
    problems = _damage_problems(snapshot, paths) if snapshot is not None else []
    notes = []
    if problems:
        notes.append("the tree, link counts and accounting were not checked: metadata is damaged")
    else:
        problems = _tree_problems(volume, paths)
    if snapshot is not None and not snapshot.replayed:
        notes.append("the log was not replayed: where it continues was in the damaged checkpoint")
    if snapshot is not None and snapshot.log.tail is not None:
        (seg, pos), reason = snapshot.log.tail
        notes.append(f"the log from segment {seg} offset {pos} on was not checked: it was written "
                     f"after the last sync ({reason}); a mount drops it if it is a torn "
                     "write")  # fmt: skip
    verified = moved = 0
    for inode in volume.inodes.values():
        bad: list[tuple[int, int, int, int]] = []
        where = paths.get(inode.ino, f"inode {inode.ino}")
        for ext in inode.extents or ():
            try:
                bad += _bad_blocks(volume, ext)
                verified += ext.length
            except (SegmentGone, FileNotFoundError):
                if snapshot is not None and snapshot.compacted(ext.frame.seg):
                    moved += ext.length  # compacted: the compactor verified it as it moved it
                else:
                    what = f"data in missing segment {ext.frame.seg}"
                    problems.append(Problem(where, what, ProblemKind.MISSING_SEGMENT, inode.ino))
            if progress is not None:
                progress(verified + moved)
        problems += _ranges(where, inode.ino, bad)
    if moved:
        notes.append(f"{moved} bytes were moved by compaction during the check and not read "
                     "(the compactor verifies what it moves)")  # fmt: skip
    return Report(problems, verified, moved, notes)


# -- pacing ------------------------------------------------------------------------------------


class Throttle:
    """A token bucket: on average at most *rate* bytes a second, in bursts of at most 1/10 s."""

    def __init__(self, rate: float, clock=time.monotonic, sleep=time.sleep) -> None:
        self._rate = rate
        self._burst = max(64 * 1024, rate / 10)
        self._tokens = self._burst
        self._clock, self._sleep = clock, sleep
        self._last = clock()

    def __call__(self, nbytes: int) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate) - nbytes
        self._last = now
        if self._tokens < 0:
            self._sleep(-self._tokens / self._rate)


# -- repair ------------------------------------------------------------------------------------


def orphans(problems: list[Problem]) -> list[Problem]:
    """The problems that `repair` repairs: inodes no directory reaches."""
    return [p for p in problems if p.kind is ProblemKind.UNREACHABLE and p.ino is not None]


def repair(volume: Volume, problems: list[Problem]) -> list[str]:
    """Fix what needs no guessing: link orphans into /lost+found.  Returns what changed.

    Link counts and accounting are recomputed from the tree whenever a volume is loaded, so a
    checkpoint (taken when the repaired volume closes) settles them.  Damaged data is left:
    only the file's owner knows what it should hold, and reads keep reporting EIO.
    """
    changes: list[str] = []
    if not orphans(problems):
        return changes
    root = volume.inodes[ROOT_INO]
    lost_ino = root.entries.get(b"lost+found")
    if lost_ino is None:
        lost = volume.new_inode(stat.S_IFDIR | 0o700, 0, 0, 0, time.time_ns())
        volume.create(root, b"lost+found", lost, time.time_ns())
        lost_ino = lost.ino
        changes.append("created /lost+found")
    lost = volume.inodes[lost_ino]
    for problem in orphans(problems):
        ino = problem.ino
        assert ino is not None  # `orphans` keeps only problems that name their inode
        inode = volume.inodes[ino]
        volume.link(inode, lost, b"#%d" % ino, time.time_ns())
        changes.append(f"inode {ino} linked as /lost+found/#{ino}")
    return changes
