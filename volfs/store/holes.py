"""Allocating byte ranges of a file and punching holes into it: what fallocate(2) does.

The log has no record of its own for either, so both are built from the records there are,
and a store written this way is read by any volfs of its format:

* **Allocating** fills each hole of the range with zeros, written like any data (one WRITE
  frame per hole piece, a piece within one chunk): a hole has no bytes in the log, so the
  zeros are what holds the space and counts against the volume's size.  The whole range is
  checked against the size first, so a range that does not fit is refused (`NoSpace`) with
  nothing written.  A file that grows gets its new size (and times) in a first frame, so
  what a user sees changes at once (only the blocks held grow after it, piece by piece).
* **Punching** is one frame of three records: an INODE record that truncates the file at the
  start of the hole, an EXTENTS record that maps again every extent (or piece of one) past
  its end, to the same log data, and an INODE record that gives the file back its size, with
  the change times.  Truncating gives up the data of the hole and nothing else, so the
  chunks the hole covers entirely are freed and the rest reads as zeros.  The records of the
  part past the hole grow with its extents: past `MAX_PUNCH_TAIL` of them the frame would
  exceed the largest one the bound of a sized volume's log allows for, so then the data in
  the range is overwritten with zeros instead (what it reads is the same; nothing is freed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from volfs.store.extents import ExtentMap
from volfs.store.records import ExtentsRecord, StoredExtent
from volfs.store.state import EXTENT_COST, Inode

if TYPE_CHECKING:
    from volfs.store.volume import Volume

#: Most extents past a hole that a punch maps again in its frame (about 180 bytes each).
MAX_PUNCH_TAIL = 256

_ZEROS = bytes(1 << 20)  #: the largest hole piece (one chunk) of zeros, sliced as needed


def _extents(inode: Inode) -> ExtentMap:
    if inode.extents is None:
        raise TypeError(f"inode {inode.ino} is not a regular file")
    return inode.extents


def hole_pieces(inode: Inode, start: int, end: int) -> list[tuple[int, int]]:
    """(offset, length) of each hole in [start, end), each within one chunk."""
    return [(pos, n) for pos, n, fr, _ in _extents(inode).pieces(start, end) if fr is None]


def allocate(volume: Volume, inode: Inode, offset: int, length: int, keep_size: bool,
             now_ns: int) -> None:  # fmt: skip
    """Give [offset, offset+length) of *inode* space in the store: zeros where it has holes.

    Without *keep_size* the file grows to the end of the range.  With it, only the part
    before the end of the file is filled: data past the size cannot be stored (a WRITE
    moves the size), so the part beyond is checked against the volume's size and refused if
    it does not fit, but not held.
    """
    end = offset + length
    fill_end = min(end, inode.size) if keep_size else end
    pieces = hole_pieces(inode, offset, fill_end) if fill_end > offset else []
    charge = sum(n for _, n in pieces) + EXTENT_COST * len(pieces)
    if keep_size and end > max(offset, inode.size):
        charge += end - max(offset, inode.size)
    volume.space.check_room(charge)  # all of it, before the first frame
    if not keep_size and end > inode.size:
        # The size and times first, in one frame: the pieces after it change nothing a user
        # sees (their mtime is the same), so the allocation shows whole or not at all.
        volume.commit([inode.record(size=end, mtime_ns=now_ns, ctime_ns=now_ns)])
    for pos, n in pieces:
        volume.write(inode, pos, _ZEROS[:n], now_ns)


def punch(volume: Volume, inode: Inode, offset: int, length: int, now_ns: int) -> None:
    """Make [offset, offset+length) of *inode* read as zeros, its size as it is: a hole, or,
    past `MAX_PUNCH_TAIL` extents after it, its data overwritten with zeros (freeing none)."""
    size = inode.size
    end = min(offset + length, size)
    if end <= offset:
        return  # past the end of the file: nothing to punch
    tail = _extents(inode).extents_after(end)
    if len(tail) > MAX_PUNCH_TAIL:
        for pos, n, fr, _ in _extents(inode).pieces(offset, end):
            if fr is not None:
                volume.write(inode, pos, _ZEROS[:n], now_ns)
        return
    kept = []
    for ext in tail:  # an extent the hole's end cuts keeps only its part past the hole
        cut = max(0, end - ext.start)
        fr = ext.frame
        kept.append(StoredExtent(ext.start + cut, ext.length - cut, ext.skip + cut,
                                 fr.seg, fr.pos, fr.length, list(fr.sums)))  # fmt: skip
    volume.commit([
        inode.record(size=offset),
        ExtentsRecord(inode.ino, kept),
        inode.record(size=size, mtime_ns=now_ns, ctime_ns=now_ns),
    ])  # fmt: skip
