"""Where each byte range of a file lives in the log: the file's chunks and their extents.

A file is cut into chunks of ``CHUNK_SIZE`` bytes of file offset.  Each chunk holds a sorted,
non-overlapping list of extents; an extent maps ``length`` bytes at file offset ``start`` to the
data part of one log frame, ``skip`` bytes into it, and never crosses a chunk boundary.  Frames
are immutable, so overwriting part of an extent only trims or splits the extents it covers;
several extents may share one frame.  Ranges with no extent are holes and read as zeros.

Chunks keep every update local: a file rewritten by millions of 4 KiB random writes has
millions of extents, but a write only touches the few hundred of its own chunk.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator
from typing import NamedTuple

CHUNK_SIZE = 1 << 20


class Frame(NamedTuple):
    """The data part of one log frame: where it is and the checksum of each block of it."""

    seg: int
    pos: int  #: offset of the first data byte in the segment file
    length: int
    sums: tuple[int, ...]


class Extent(NamedTuple):
    start: int
    length: int
    skip: int  #: offset of this extent's first byte within ``frame``
    frame: Frame


Removed = list[tuple[Frame, int]]


class _Chunk:
    """The extents of one chunk, sorted by start, in two parallel lists for bisect."""

    __slots__ = ("extents", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.extents: list[Extent] = []

    def first_touching(self, offset: int) -> int:
        """Index of the first extent that ends after *offset*."""
        i = bisect_right(self.starts, offset) - 1
        if i < 0:
            return 0
        ext = self.extents[i]
        return i if ext.start + ext.length > offset else i + 1

    def punch(self, start: int, end: int, removed: Removed) -> None:
        i = j = self.first_touching(start)
        kept: list[Extent] = []
        extents = self.extents
        while j < len(extents) and extents[j].start < end:
            ext = extents[j]
            ext_end = ext.start + ext.length
            if ext.start < start:
                kept.append(Extent(ext.start, start - ext.start, ext.skip, ext.frame))
            if ext_end > end:
                kept.append(Extent(end, ext_end - end, ext.skip + end - ext.start, ext.frame))
            removed.append((ext.frame, min(ext_end, end) - max(ext.start, start)))
            j += 1
        if i != j:
            extents[i:j] = kept
            self.starts[i:j] = [ext.start for ext in kept]

    def insert(self, ext: Extent) -> None:
        i = bisect_right(self.starts, ext.start)
        self.starts.insert(i, ext.start)
        self.extents.insert(i, ext)

    def pieces(self, start: int, end: int) -> Iterator[tuple[int, int, Frame | None, int]]:
        extents = self.extents
        i = self.first_touching(start)
        pos = start
        while pos < end:
            if i < len(extents) and extents[i].start <= pos:
                ext = extents[i]
                take = min(end, ext.start + ext.length) - pos
                yield pos, take, ext.frame, ext.skip + pos - ext.start
                i += 1
            else:
                take = (min(end, extents[i].start) if i < len(extents) else end) - pos
                yield pos, take, None, 0
            pos += take


class ExtentMap:
    """The extents of one file."""

    __slots__ = ("_chunks",)

    def __init__(self) -> None:
        self._chunks: dict[int, _Chunk] = {}

    def __iter__(self) -> Iterator[Extent]:
        for index in sorted(self._chunks):
            yield from self._chunks[index].extents

    def __len__(self) -> int:
        return sum(len(c.extents) for c in self._chunks.values())

    def _indexes(self, start: int, end: int) -> list[int]:
        """Indexes of the chunks that exist within [start, end), in order."""
        first, last = start // CHUNK_SIZE, (end - 1) // CHUNK_SIZE
        if last - first < len(self._chunks):
            return [i for i in range(first, last + 1) if i in self._chunks]
        return sorted(i for i in self._chunks if first <= i <= last)

    def punch(self, start: int, end: int) -> Removed:
        """Make [start, end) a hole; return (frame, bytes) for every piece removed."""
        removed: Removed = []
        if end <= start:
            return removed
        for index in self._indexes(start, end):
            chunk = self._chunks[index]
            chunk.punch(start, end, removed)
            if not chunk.extents:
                del self._chunks[index]
        return removed

    def put(self, start: int, length: int, frame: Frame, skip: int = 0) -> Removed:
        """Map [start, start+length) to *frame*; return the pieces it replaced."""
        removed = self.punch(start, start + length)
        end = start + length
        pos = start
        while pos < end:
            index = pos // CHUNK_SIZE
            take = min(end, (index + 1) * CHUNK_SIZE) - pos
            chunk = self._chunks.get(index)
            if chunk is None:
                chunk = self._chunks[index] = _Chunk()
            chunk.insert(Extent(pos, take, skip + pos - start, frame))
            pos += take
        return removed

    def truncate(self, size: int) -> Removed:
        """Drop everything at or beyond *size*."""
        if not self._chunks:
            return []
        return self.punch(size, max(size, (max(self._chunks) + 1) * CHUNK_SIZE))

    def pieces(self, start: int, end: int) -> Iterator[tuple[int, int, Frame | None, int]]:
        """Cover [start, end) with (offset, length, frame, skip); holes have frame None."""
        pos = start
        while pos < end:
            index = pos // CHUNK_SIZE
            stop = min(end, (index + 1) * CHUNK_SIZE)
            chunk = self._chunks.get(index)
            if chunk is None:
                yield pos, stop - pos, None, 0
            else:
                yield from chunk.pieces(pos, stop)
            pos = stop
