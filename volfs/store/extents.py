"""Where each byte range of a file lives in the log: the file's chunks and their extents.

A file is cut into chunks of ``CHUNK_SIZE`` bytes of file offset.  Each chunk is a sorted,
non-overlapping list of extents; an extent maps ``length`` bytes at file offset ``start`` to the
data part of one log frame, ``skip`` bytes into it, and never crosses a chunk boundary.  Frames
are immutable, so overwriting part of an extent only trims or splits the extents it covers;
several extents may share one frame.  Ranges with no extent are holes and read as zeros.

Chunks keep every update local: a file rewritten by millions of 4 KiB random writes has
millions of extents, but a write only touches the few hundred of its own chunk.

Every file's map stays in memory, so its shape is chosen for size: an empty file's map is one
small object, a file within one chunk needs no dict, and a chunk is a bare list searched by
each extent's start.
"""

from __future__ import annotations

from bisect import bisect_right, insort_right
from collections.abc import Iterable, Iterator
from operator import itemgetter
from typing import NamedTuple

CHUNK_SIZE = 1 << 20


class FrameData(NamedTuple):
    """The data part of one log frame: where it is and the checksum of each block of it."""

    seg: int
    pos: int  #: offset of the first data byte in the segment file
    length: int
    sums: tuple[int, ...]


class Extent(NamedTuple):
    start: int
    length: int
    skip: int  #: offset of this extent's first byte within ``frame``
    frame: FrameData


#: (frame, bytes, extents) for each extent a change touched: the bytes of it no longer used,
#: and how the number of extents of that frame changed (-1 gone, 0 trimmed, +1 split in two).
Removed = list[tuple[FrameData, int, int]]
Chunk = list[Extent]  #: sorted by start

_start = itemgetter(0)


def _first_touching(chunk: Chunk, offset: int) -> int:
    """Index of the first extent of *chunk* that ends after *offset*."""
    i = bisect_right(chunk, offset, key=_start) - 1
    if i < 0:
        return 0
    ext = chunk[i]
    return i if ext.start + ext.length > offset else i + 1


def _punch_chunk(chunk: Chunk, start: int, end: int, removed: Removed) -> None:
    i = j = _first_touching(chunk, start)
    kept: list[Extent] = []
    while j < len(chunk) and chunk[j].start < end:
        ext = chunk[j]
        ext_end = ext.start + ext.length
        pieces = 0
        if ext.start < start:
            kept.append(Extent(ext.start, start - ext.start, ext.skip, ext.frame))
            pieces += 1
        if ext_end > end:
            kept.append(Extent(end, ext_end - end, ext.skip + end - ext.start, ext.frame))
            pieces += 1
        removed.append((ext.frame, min(ext_end, end) - max(ext.start, start), pieces - 1))
        j += 1
    if i != j:
        chunk[i:j] = kept


def _chunk_pieces(
    chunk: Chunk, start: int, end: int
) -> Iterator[tuple[int, int, FrameData | None, int]]:
    i = _first_touching(chunk, start)
    pos = start
    while pos < end:
        if i < len(chunk) and chunk[i].start <= pos:
            ext = chunk[i]
            take = min(end, ext.start + ext.length) - pos
            yield pos, take, ext.frame, ext.skip + pos - ext.start
            i += 1
        else:
            take = (min(end, chunk[i].start) if i < len(chunk) else end) - pos
            yield pos, take, None, 0
        pos += take


def extents_of(start: int, length: int) -> int:
    """How many extents `ExtentMap.put` makes for *length* bytes at *start*."""
    if length <= 0:
        return 0
    return (start + length - 1) // CHUNK_SIZE - start // CHUNK_SIZE + 1


class ExtentMap:
    """The extents of one file, by chunk.

    Chunk 0 has a slot of its own and the others share a dict made on demand: most files
    are smaller than a chunk, and a dict would cost more than the extents in it.
    """

    __slots__ = ("_first", "_more")

    def __init__(self) -> None:
        self._first: Chunk | None = None  #: chunk 0
        self._more: dict[int, Chunk] | None = None  #: chunks 1 and up, by index

    def _chunk(self, index: int) -> Chunk | None:
        if index == 0:
            return self._first
        return None if self._more is None else self._more.get(index)

    def _new_chunk(self, index: int) -> Chunk:
        chunk: Chunk = []
        if index == 0:
            self._first = chunk
        else:
            if self._more is None:
                self._more = {}
            self._more[index] = chunk
        return chunk

    def _drop_chunk(self, index: int) -> None:
        if index == 0:
            self._first = None
        elif self._more is not None:
            del self._more[index]
            if not self._more:
                self._more = None

    def _indexes(self) -> list[int]:
        """Indexes of the chunks that exist, in order."""
        more = sorted(self._more) if self._more else []
        return more if self._first is None else [0, *more]

    def __iter__(self) -> Iterator[Extent]:
        for index in self._indexes():
            yield from self._chunk(index) or ()

    def __len__(self) -> int:
        return sum(len(self._chunk(index) or ()) for index in self._indexes())

    def __bool__(self) -> bool:
        return self._first is not None or self._more is not None

    def change(self, start: int, end: int) -> tuple[int, int]:
        """What putting one frame at [start, end) would change, without changing anything:
        (bytes of the range that are holes now, how many extents more the file would have)."""
        new_bytes = extents = 0
        pos = start
        while pos < end:
            index = pos // CHUNK_SIZE
            stop = min(end, (index + 1) * CHUNK_SIZE)
            extents += 1  # the new frame's extent in this chunk
            chunk = self._chunk(index)
            i = 0 if chunk is None else _first_touching(chunk, pos)
            covered = 0
            while chunk is not None and i < len(chunk) and chunk[i].start < stop:
                ext = chunk[i]
                ext_end = ext.start + ext.length
                covered += min(ext_end, stop) - max(ext.start, pos)
                extents += (ext.start < pos) + (ext_end > stop) - 1
                i += 1
            new_bytes += stop - pos - covered
            pos = stop
        return new_bytes, extents

    def punch(self, start: int, end: int) -> Removed:
        """Make [start, end) a hole; return (frame, bytes) for every piece removed."""
        removed: Removed = []
        if end <= start or not self:
            return removed
        first, last = start // CHUNK_SIZE, (end - 1) // CHUNK_SIZE
        indexes: Iterable[int]
        if last - first < 1 + len(self._more or ()):
            indexes = range(first, last + 1)
        else:
            indexes = [i for i in self._indexes() if first <= i <= last]
        for index in indexes:
            chunk = self._chunk(index)
            if chunk is not None:
                _punch_chunk(chunk, start, end, removed)
                if not chunk:
                    self._drop_chunk(index)
        return removed

    def put(self, start: int, length: int, frame: FrameData, skip: int = 0) -> Removed:
        """Map [start, start+length) to *frame*; return the pieces it replaced.

        The range gets one new extent per chunk it touches (`extents_of`)."""
        removed = self.punch(start, start + length)
        end = start + length
        pos = start
        while pos < end:
            index = pos // CHUNK_SIZE
            take = min(end, (index + 1) * CHUNK_SIZE) - pos
            chunk = self._chunk(index)
            if chunk is None:
                chunk = self._new_chunk(index)
            insort_right(chunk, Extent(pos, take, skip + pos - start, frame), key=_start)
            pos += take
        return removed

    def truncate(self, size: int) -> Removed:
        """Drop everything at or beyond *size*."""
        if not self:
            return []
        return self.punch(size, max(size, (self._indexes()[-1] + 1) * CHUNK_SIZE))

    def _indexes_from(self, index: int) -> list[int]:
        """Indexes of the chunks that exist from *index* on, in order."""
        return [i for i in self._indexes() if i >= index]

    def extents_after(self, offset: int) -> list[Extent]:
        """The extents that end after *offset*, in order."""
        found: list[Extent] = []
        for index in self._indexes_from(offset // CHUNK_SIZE):
            chunk = self._chunk(index) or []
            found.extend(chunk[_first_touching(chunk, offset) :])
        return found

    def next_data(self, offset: int) -> int | None:
        """The first offset at or after *offset* that an extent maps; None if none does."""
        for index in self._indexes_from(offset // CHUNK_SIZE):
            chunk = self._chunk(index) or []
            i = _first_touching(chunk, offset)
            if i < len(chunk):
                return max(offset, chunk[i].start)
        return None

    def next_hole(self, offset: int) -> int:
        """The first offset at or after *offset* that no extent maps (the end of the last
        extent at the latest)."""
        pos = offset
        index = pos // CHUNK_SIZE
        while True:
            chunk = self._chunk(index)
            if chunk is None:
                return pos
            i = _first_touching(chunk, pos)
            while i < len(chunk) and chunk[i].start <= pos:
                pos = chunk[i].start + chunk[i].length
                i += 1
            if pos < (index + 1) * CHUNK_SIZE:
                return pos
            index += 1

    def pieces(self, start: int, end: int) -> Iterator[tuple[int, int, FrameData | None, int]]:
        """Cover [start, end) with (offset, length, frame, skip); holes have frame None."""
        pos = start
        while pos < end:
            index = pos // CHUNK_SIZE
            stop = min(end, (index + 1) * CHUNK_SIZE)
            chunk = self._chunk(index)
            if chunk is None:
                yield pos, stop - pos, None, 0
            else:
                yield from _chunk_pieces(chunk, pos, stop)
            pos = stop
