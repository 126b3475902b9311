"""The store's pure logic, checked against simple models: extent maps, readdir cookies, frames."""

from __future__ import annotations

from itertools import pairwise

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from volfs.store import frame
from volfs.store.dirents import FIRST_OFFSET, Listing
from volfs.store.extents import CHUNK_SIZE, ExtentMap, FrameData, extents_of

# -- extent map against a bytearray -------------------------------------------------------------

SPAN = 4 * CHUNK_SIZE
ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, SPAN), st.integers(1, 2 * CHUNK_SIZE)),
        st.tuples(
            st.just("put"),
            st.sampled_from([CHUNK_SIZE - 3, CHUNK_SIZE, 2 * CHUNK_SIZE + 1]),
            st.integers(1, 600),
        ),
        st.tuples(st.just("truncate"), st.integers(0, SPAN + 600), st.just(0)),
    ),
    max_size=40,
)


@given(ops)
@settings(max_examples=300)
def test_extent_map_matches_bytes(operations):
    """Each put writes a distinct byte value; pieces() must reproduce the model exactly.

    Extents never cross a chunk boundary, and the bytes removed plus the bytes kept always
    equal the bytes put, and the extent counts of what was removed add up too (the live-data
    and quota accounting of the store depend on it); `change` foretells what a put does."""
    model = bytearray()
    extents = ExtentMap()
    frames: dict[int, tuple[FrameData, int]] = {}
    live = count = 0
    for n, (op, offset, length) in enumerate(operations, start=1):
        if op == "put":
            fr = FrameData(n, 0, length, ())
            frames[n] = (fr, n % 251 + 1)
            predicted = extents.change(offset, offset + length)
            before = len(extents)
            removed = extents.put(offset, length, fr)
            live += length - sum(size for _, size, _ in removed)
            count += extents_of(offset, length) + sum(n for _, _, n in removed)
            assert predicted == (
                length - sum(size for _, size, _ in removed),
                len(extents) - before,
            )
            if len(model) < offset + length:
                model.extend(bytes(offset + length - len(model)))
            model[offset : offset + length] = bytes([n % 251 + 1]) * length
        else:
            removed = extents.truncate(offset)
            live -= sum(size for _, size, _ in removed)
            count += sum(n for _, _, n in removed)
            del model[offset:]
        rebuilt = bytearray()
        for pos, size, fr, skip in extents.pieces(0, len(model)):
            assert pos == len(rebuilt)
            assert fr is None or (skip >= 0 and skip + size <= fr.length)
            rebuilt += bytes(size) if fr is None else bytes([frames[fr.seg][1]]) * size
        assert rebuilt == model
        assert live == sum(e.length for e in extents)
        assert count == len(extents)
        starts = [e.start for e in extents]
        assert starts == sorted(starts)
        assert all(a.start + a.length <= b.start for a, b in pairwise(extents))
        assert all(e.start // CHUNK_SIZE == (e.start + e.length - 1) // CHUNK_SIZE for e in extents)


def test_extent_pieces_of_a_range_inside_one_extent():
    extents = ExtentMap()
    fr = FrameData(1, 100, 1000, ())
    extents.put(500, 1000, fr)
    assert list(extents.pieces(0, 600)) == [(0, 500, None, 0), (500, 100, fr, 0)]
    assert list(extents.pieces(700, 800)) == [(700, 100, fr, 200)]
    assert list(extents.pieces(1400, 1600)) == [(1400, 100, fr, 900), (1500, 100, None, 0)]


# -- directory entries --------------------------------------------------------------------------


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 40)), max_size=200), st.data())
def test_listing_offsets_never_repeat_or_skip(changes, data):
    entries = {b"base%d" % i: i for i in range(20)}
    listing = Listing(entries)
    listed: list[bytes] = []
    offset = 0
    for add, n in changes:
        name = b"x%d" % n
        if add:
            entries[name] = 1000 + n
        else:
            entries.pop(name, None)
        batch = list(listing.after(offset))[: data.draw(st.integers(1, 5))]
        for name_, ino, next_offset in batch:
            assert entries[name_] == ino
            assert next_offset > offset >= 0
            listed.append(name_)
            offset = next_offset
    listed += [name for name, _ino, _offset in listing.after(offset)]
    # Entries that existed throughout appear exactly once, and no name appears twice.
    assert len(listed) == len(set(listed))
    assert {name for name in listed if name.startswith(b"base")} == {
        b"base%d" % i for i in range(20)
    }


def test_listing_rewind_sees_new_entries():
    entries = {b"a": 2}
    listing = Listing(entries)
    assert [name for name, _, _ in listing.after(0)] == [b"a"]
    entries[b"b"] = 3
    del entries[b"a"]
    assert [name for name, _, _ in listing.after(FIRST_OFFSET)] == []
    assert [(name, ino) for name, ino, _ in listing.after(0)] == [(b"b", 3)]


# -- frames -------------------------------------------------------------------------------------


def test_frame_roundtrip():
    header, meta, data = frame.encode([[1, 2, b"x"]], b"payload")
    assert frame.decode_meta(header, meta) == [[1, 2, b"x"]]
    assert frame.decode_header(header)[1] == len(data)


@given(st.binary(min_size=16, max_size=200))
@settings(max_examples=500)
def test_frame_decoder_rejects_garbage(blob):
    """Random bytes decode to an error (or, astronomically rarely, a valid frame): never a crash."""
    try:
        meta_len, _, _ = frame.decode_header(blob[:16])
        frame.decode_meta(blob[:16], blob[16 : 16 + meta_len])
    except frame.FrameError:
        pass


@given(st.integers(0, 15), st.integers(0, 7))
def test_any_flipped_bit_in_a_frame_is_detected(byte, bit):
    header, meta = frame.encode([[4, 1, b"a", b"b"]])
    raw = bytearray(header + meta)
    index = byte if byte < 16 else 16 + (byte - 16) % len(meta)
    raw[index % len(raw)] ^= 1 << bit
    with pytest.raises(frame.FrameError):
        meta_len, _, _ = frame.decode_header(bytes(raw[:16]))
        frame.decode_meta(bytes(raw[:16]), bytes(raw[16 : 16 + meta_len]))


def test_block_sums_detect_each_block():
    data = bytes(range(256)) * 1024  # 256 KiB: four blocks
    sums = frame.block_sums(data)
    assert len(sums) == 4
    damaged = bytearray(data)
    damaged[frame.BLOCK_SIZE * 2 + 5] ^= 1
    assert frame.bad_blocks(damaged, 0, sums) == [2]
    assert frame.bad_blocks(data[frame.BLOCK_SIZE :], 1, sums) == []
    assert msgpack.unpackb(msgpack.packb(sums)) == sums
