"""Where each byte range of a file lives in the log: a sorted, non-overlapping extent map.

An extent maps ``length`` bytes at file offset ``start`` to the data part of one log frame,
``skip`` bytes into it.  Frames are immutable, so overwriting part of an extent only trims or
splits the extents it covers; several extents may share one frame.  Ranges with no extent are
holes and read as zeros.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator
from typing import NamedTuple


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


class ExtentMap:
    """The extents of one file, kept sorted by start offset."""

    __slots__ = ("_extents", "_starts")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._extents: list[Extent] = []

    def __iter__(self) -> Iterator[Extent]:
        return iter(self._extents)

    def __len__(self) -> int:
        return len(self._extents)

    def _first_touching(self, offset: int) -> int:
        """Index of the first extent that ends after *offset*."""
        i = bisect_right(self._starts, offset) - 1
        if i < 0:
            return 0
        ext = self._extents[i]
        return i if ext.start + ext.length > offset else i + 1

    def punch(self, start: int, end: int) -> list[tuple[Frame, int]]:
        """Make [start, end) a hole; return (frame, bytes) for every piece removed."""
        if end <= start:
            return []
        i = j = self._first_touching(start)
        kept: list[Extent] = []
        removed: list[tuple[Frame, int]] = []
        extents = self._extents
        while j < len(extents) and extents[j].start < end:
            ext = extents[j]
            ext_end = ext.start + ext.length
            if ext.start < start:
                kept.append(Extent(ext.start, start - ext.start, ext.skip, ext.frame))
            if ext_end > end:
                kept.append(Extent(end, ext_end - end, ext.skip + end - ext.start, ext.frame))
            removed.append((ext.frame, min(ext_end, end) - max(ext.start, start)))
            j += 1
        extents[i:j] = kept
        self._starts[i:j] = [ext.start for ext in kept]
        return removed

    def put(self, start: int, length: int, frame: Frame, skip: int = 0) -> list[tuple[Frame, int]]:
        """Map [start, start+length) to *frame*; return the pieces it replaced."""
        removed = self.punch(start, start + length)
        i = bisect_right(self._starts, start)
        self._starts.insert(i, start)
        self._extents.insert(i, Extent(start, length, skip, frame))
        return removed

    def truncate(self, size: int) -> list[tuple[Frame, int]]:
        """Drop everything at or beyond *size*."""
        if not self._extents:
            return []
        last = self._extents[-1]
        return self.punch(size, max(size, last.start + last.length))

    def pieces(self, start: int, end: int) -> Iterator[tuple[int, int, Frame | None, int]]:
        """Cover [start, end) with (offset, length, frame, skip); holes have frame None."""
        extents = self._extents
        i = self._first_touching(start)
        pos = start
        while pos < end:
            if i < len(extents) and extents[i].start <= pos:
                ext = extents[i]
                take = min(end, ext.start + ext.length) - pos
                yield pos, take, ext.frame, ext.skip + pos - ext.start
                i += 1
            else:
                hole_end = min(end, extents[i].start) if i < len(extents) else end
                yield pos, hole_end - pos, None, 0
                take = hole_end - pos
            pos += take
