"""The framing shared by every record volfs writes: log segments, checkpoints, volume headers.

A frame is a fixed 16-byte header, a msgpack *meta* part and an optional raw *data* part::

    u32 meta_len | u32 data_len | u64 xxh3_64(first 8 header bytes + meta) | meta | data

The header checksum covers the lengths and the meta bytes, so a torn or damaged header or meta
part is always detected and never misread.  The data part is not covered by the header
checksum: it carries its own checksums, one per ``BLOCK_SIZE`` piece, inside the meta part, so
that a small read of a large frame verifies only the blocks it touches.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import msgpack
import xxhash

HEADER = struct.Struct("<IIQ")
LENGTHS = struct.Struct("<II")

#: Checksum granularity of frame data.  64 KiB keeps hashing of 1 MiB writes at ~28 us
#: (4 KiB blocks cost ~80 us) while a 4 KiB random read verifies at most 128 KiB.
BLOCK_SIZE = 64 * 1024

#: Largest meta part we accept when decoding; a bigger length can only be damage.
MAX_META = 64 * 1024 * 1024
#: Largest data part of one frame (FUSE writes are at most 1 MiB; checkpoints carry no data).
MAX_DATA = 16 * 1024 * 1024

_hash = xxhash.xxh3_64_intdigest


class FrameError(Exception):
    """A frame that cannot be trusted: torn, damaged, or not a frame at all."""


def encode_header(meta: bytes, data_len: int) -> bytes:
    """Return the 16-byte header for *meta* followed by *data_len* bytes of data."""
    lengths = LENGTHS.pack(len(meta), data_len)
    return lengths + _hash(lengths + meta).to_bytes(8, "little")


def encode(meta_obj: object, data: bytes = b"") -> list[bytes]:
    """Encode one frame as a list of buffers, ready for a single ``pwritev``."""
    meta = msgpack.packb(meta_obj, use_bin_type=True)
    return [encode_header(meta, len(data)), meta, data] if data else [encode_header(meta, 0), meta]


def decode_header(header: bytes) -> tuple[int, int, int]:
    """Split a header into (meta_len, data_len, checksum), rejecting impossible lengths."""
    if len(header) < HEADER.size:
        raise FrameError("short header")
    meta_len, data_len, checksum = HEADER.unpack_from(header)
    if meta_len == 0 or meta_len > MAX_META or data_len > MAX_DATA:
        raise FrameError(f"impossible lengths meta={meta_len} data={data_len}")
    return meta_len, data_len, checksum


def decode_meta(header: bytes, meta: bytes) -> object:
    """Verify *meta* against *header* and unpack it."""
    meta_len, _data_len, checksum = decode_header(header)
    if len(meta) != meta_len:
        raise FrameError("short meta")
    if _hash(header[:8] + meta) != checksum:
        raise FrameError("header checksum mismatch")
    try:
        return msgpack.unpackb(meta, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise FrameError(f"undecodable meta: {exc}") from None


def block_sums(data: bytes | memoryview) -> list[int]:
    """Checksums of *data* in ``BLOCK_SIZE`` pieces (the last one may be shorter)."""
    view = memoryview(data)
    return [_hash(view[i : i + BLOCK_SIZE]) for i in range(0, len(view), BLOCK_SIZE)]


def bad_blocks(data: bytes | memoryview, first_block: int, sums: Sequence[int]) -> list[int]:
    """Indexes of the blocks of *data* (starting at block *first_block*) that fail *sums*."""
    view = memoryview(data)
    bad = []
    for n, i in enumerate(range(0, len(view), BLOCK_SIZE), start=first_block):
        if _hash(view[i : i + BLOCK_SIZE]) != sums[n]:
            bad.append(n)
    return bad
