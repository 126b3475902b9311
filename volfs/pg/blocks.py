"""A file's data in the PostgreSQL engine: rows of at most one block, each checksummed.

A block is `BLOCK_SIZE` bytes of a file (block *idx* covers [idx*B, (idx+1)*B)).  Its row, if
it has one, holds one run of it: the bytes from ``start`` (within the block) on, as many as
``data`` has; before and after the run the block is a hole, and a block without a row is a
hole.  So a file's ``stored`` is the sum of its rows' lengths, and SEEK_DATA finds the first
byte of a run, not of its block.  Each row carries the xxh3-64 of its data, verified on every
read: a mismatch is `DataDamaged` (with a log line naming the volume, inode and bytes), never
wrong bytes.

Every function takes the step's connection, the volume id and the inode, changes only rows,
and returns how many bytes of data the file holds more (or fewer) afterwards: the view keeps
the inode's ``stored`` and the volume's total by that.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import psycopg
import xxhash

from volfs.errors import DataDamaged
from volfs.pg.schema import BLOCK_SIZE

log = logging.getLogger(__name__)

Conn = psycopg.Connection[Any]
_B = BLOCK_SIZE
_UPSERT = (
    "INSERT INTO blocks VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (volume, ino, idx) DO UPDATE"
    " SET start = excluded.start, data = excluded.data, xxh3 = excluded.xxh3"
)


def checksum(data: bytes | bytearray) -> int:
    """xxh3-64 of *data* as PostgreSQL's signed bigint."""
    value = xxhash.xxh3_64_intdigest(data)
    return value - (1 << 64) if value >= 1 << 63 else value


def _blocks(start: int, end: int) -> range:
    """The indexes of the blocks [start, end) touches (end > start)."""
    return range(start // _B, (end - 1) // _B + 1)


def _rows(conn: Conn, vid: int, ino: int, idxs: list[int]) -> dict[int, tuple[int, bytes]]:
    """The rows of blocks *idxs*: start and data, by index."""
    rows = conn.execute(
        "SELECT idx, start, data FROM blocks WHERE volume = %s AND ino = %s AND idx = ANY(%s)",
        (vid, ino, idxs),
    ).fetchall()
    return {idx: (start, bytes(data)) for idx, start, data in rows}


def _put(conn: Conn, vid: int, ino: int, rows: Iterable[tuple[int, int, bytes]]) -> None:
    conn.cursor().executemany(
        _UPSERT, [(vid, ino, idx, start, data, checksum(data)) for idx, start, data in rows]
    )


def write(conn: Conn, vid: int, ino: int, offset: int, data: bytes, keep: bool = False) -> int:
    """Put *data* at *offset* (with *keep*: only where the file has no data, for zeros that
    fill holes); the change of the file's stored bytes."""
    end = offset + len(data)
    blocks = _blocks(offset, end)
    # Only blocks the write does not cover whole are merged with what they hold; of whole
    # ones only the old lengths are needed.  One query for both.
    edges = [i for i in (blocks[0], blocks[-1]) if offset > i * _B or end < (i + 1) * _B]
    merge = list(blocks) if keep else edges
    old_lengths: dict[int, int] = {}
    merged: dict[int, tuple[int, bytes]] = {}
    for idx, start, length, old_data in conn.execute(
        "SELECT idx, start, length(data), CASE WHEN idx = ANY(%s) THEN data END FROM blocks"
        " WHERE volume = %s AND ino = %s AND idx BETWEEN %s AND %s",
        (merge, vid, ino, blocks[0], blocks[-1]),
    ).fetchall():
        old_lengths[idx] = length
        if old_data is not None:
            merged[idx] = (start, bytes(old_data))
    new_rows = []
    for idx in blocks:
        lo, hi = max(offset, idx * _B) - idx * _B, min(end, (idx + 1) * _B) - idx * _B
        piece = data[idx * _B + lo - offset : idx * _B + hi - offset]
        if idx not in merged:
            new_rows.append((idx, lo, piece))
            continue
        start, old = merged[idx]
        first, last = min(start, lo), max(start + len(old), hi)
        buf = bytearray(last - first)
        if keep:
            buf[lo - first : hi - first] = piece
            buf[start - first : start - first + len(old)] = old
        else:
            buf[start - first : start - first + len(old)] = old
            buf[lo - first : hi - first] = piece
        new_rows.append((idx, first, bytes(buf)))
    _put(conn, vid, ino, new_rows)
    return sum(len(d) for _, _, d in new_rows) - sum(old_lengths.values())


def read(conn: Conn, volume: str, vid: int, ino: int, offset: int, end: int) -> bytes:
    """The bytes [offset, end) of a file (zeros in its holes), each row verified."""
    if offset >= end:
        return b""
    blocks = _blocks(offset, end)
    rows = conn.execute(
        "SELECT idx, start, data, xxh3 FROM blocks WHERE volume = %s AND ino = %s"
        " AND idx BETWEEN %s AND %s",
        (vid, ino, blocks[0], blocks[-1]),
    ).fetchall()
    out = bytearray(end - offset)
    for idx, start, data, xxh3 in rows:
        first = idx * _B + start
        if checksum(data) != xxh3:
            _damaged(volume, ino, first, first + len(data), f"block {idx} fails its checksum")
        lo, hi = max(first, offset), min(first + len(data), end)
        if lo < hi:
            out[lo - offset : hi - offset] = data[lo - first : hi - first]
    return bytes(out)


def _damaged(volume: str, ino: int, start: int, end: int, what: str) -> None:
    log.error("volume %s: damaged data in inode %d, bytes %d-%d (%s)", volume, ino, start,
              end, what, extra={"volume": volume, "inode": ino})  # fmt: skip
    raise DataDamaged(what, ino, start, end)


def cut(conn: Conn, vid: int, ino: int, start: int, end: int) -> int:
    """Make [start, end) a hole (a truncation: *end* past every block); the change of the
    file's stored bytes (zero or less)."""
    if start >= end:
        return 0
    first, last = start // _B, (end - 1) // _B
    removed = 0
    # Blocks wholly inside go; the (at most two) blocks at the edges are trimmed or zeroed.
    inner_first = first if start % _B == 0 else first + 1
    inner_last = last if end % _B == 0 or end >= (last + 1) * _B else last - 1
    if inner_first <= inner_last:
        gone = conn.execute(
            "DELETE FROM blocks WHERE volume = %s AND ino = %s AND idx BETWEEN %s AND %s"
            " RETURNING length(data)",
            (vid, ino, inner_first, inner_last),
        ).fetchall()
        removed += sum(length for (length,) in gone)
    edges = sorted({i for i in (first, last) if not inner_first <= i <= inner_last})
    if not edges:
        return -removed
    rows = _rows(conn, vid, ino, edges)
    changed = []
    for idx in edges:
        if idx not in rows:
            continue
        row_start, data = rows[idx]
        base = idx * _B + row_start
        lo, hi = max(start, base) - base, min(end, base + len(data)) - base
        if lo >= hi:
            continue
        if lo == 0 and hi == len(data):
            conn.execute("DELETE FROM blocks WHERE volume = %s AND ino = %s AND idx = %s",
                         (vid, ino, idx))  # fmt: skip
        elif lo == 0:
            changed.append((idx, row_start + hi, data[hi:]))
        elif hi == len(data):
            changed.append((idx, row_start, data[:lo]))
        else:  # inside the run: zeros, the run stays one
            changed.append((idx, row_start, data[:lo] + bytes(hi - lo) + data[hi:]))
            continue
        removed += hi - lo
    if changed:
        _put(conn, vid, ino, changed)
    return -removed


def seek(conn: Conn, vid: int, ino: int, size: int, offset: int, hole: bool) -> int | None:
    """SEEK_DATA (or with *hole* SEEK_HOLE) from *offset* of a file of *size* bytes; None if
    *offset* is at or past the end, or no data follows."""
    if offset >= size:
        return None
    runs = conn.execute(
        "SELECT idx * %s + start, idx * %s + start + length(data) FROM blocks"
        " WHERE volume = %s AND ino = %s AND idx >= %s ORDER BY idx",
        (_B, _B, vid, ino, offset // _B),
    ).fetchall()
    position = offset
    for first, end in runs:
        if end <= position:
            continue
        if not hole:
            found = max(first, position)
            return found if found < size else None
        if first > position:
            return position
        position = end
    return None if not hole else min(position, size)
