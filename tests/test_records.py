"""The record codec: every record kind's fields, and the exact bytes format 1 stores them as.

The bytes are pinned here so that a change to a record class (a field added, reordered or
retyped) that would change format 1 fails a test rather than old stores (ARCHITECTURE.md,
"Records")."""

from __future__ import annotations

import msgpack
import pytest

from volfs.store import records
from volfs.store.records import (
    CheckpointRecord,
    ExchangeRecord,
    ExtentsRecord,
    InodeRecord,
    LinkRecord,
    RenameRecord,
    StoredExtent,
    UnlinkRecord,
    WriteRecord,
    XattrRecord,
)

#: One record of each kind, its msgpack list, and that list's bytes as format 1 stores them.
EXAMPLES = [
    (
        InodeRecord(2, 0o100644, 1000, 1000, 0, 5, 10, 11, 12, None),
        [1, 2, 0o100644, 1000, 1000, 0, 5, 10, 11, 12, None],
        "9b0102cd81a4cd03e8cd03e800050a0b0cc0",
    ),
    (
        InodeRecord(3, 0o120777, 0, 0, 0, 2, 1, 1, 1, b"/x"),
        [1, 3, 0o120777, 0, 0, 0, 2, 1, 1, 1, b"/x"],
        "9b0103cda1ff00000002010101c4022f78",
    ),
    (LinkRecord(1, b"name", 2), [2, 1, b"name", 2], "940201c4046e616d6502"),
    (UnlinkRecord(1, b"name"), [3, 1, b"name"], "930301c4046e616d65"),
    (RenameRecord(1, b"a", 4, b"b"), [4, 1, b"a", 4, b"b"], "950401c4016104c40162"),
    (ExchangeRecord(1, b"a", 4, b"b"), [5, 1, b"a", 4, b"b"], "950501c4016104c40162"),
    (WriteRecord(2, 0, 4, [7], 9), [6, 2, 0, 4, [7], 9], "9606020004910709"),
    (WriteRecord(2, 0, 4, [7], None), [6, 2, 0, 4, [7], None], "96060200049107c0"),
    (XattrRecord(2, b"user.k", b"v"), [7, 2, b"user.k", b"v"], "940702c406757365722e6bc40176"),
    (XattrRecord(2, b"user.k", None), [7, 2, b"user.k", None], "940702c406757365722e6bc0"),
    (
        ExtentsRecord(2, [StoredExtent(0, 4, 0, 1, 40, 4, [7])]),
        [9, 2, [[0, 4, 0, 1, 40, 4, [7]]]],
        "93090291970004000128049107",
    ),
    (CheckpointRecord(1, 3, 4096, 17), [10, 1, 3, 4096, 17], "950a0103cd100011"),
]


@pytest.mark.parametrize(("record", "stored", "packed"), EXAMPLES)
def test_each_kind_encodes_to_its_format_1_list_and_bytes(record, stored, packed):
    assert records.encode(record) == stored
    assert msgpack.packb(records.encode(record), use_bin_type=True).hex() == packed
    unpacked = msgpack.unpackb(bytes.fromhex(packed), raw=False, use_list=True)
    assert records.decode(unpacked) == record


def test_every_kind_has_an_example():
    assert {type(r) for r, _, _ in EXAMPLES} == set(records.KINDS.values())


@pytest.mark.parametrize(
    "raw",
    [[8, 1], [11, 1], ["x"], [], "text", [1, 2, 3]],
    ids=["8", "11", "str", "empty", "s", "short"],
)
def test_what_is_not_a_record_is_refused(raw):
    with pytest.raises((TypeError, ValueError)):
        records.decode(raw)


def test_fields_of_names_the_fields_of_a_garbled_record():
    cls, fields = records.fields_of([2, 1, b"x"])  # a LINK cut short
    assert cls is LinkRecord
    assert fields == {"parent": 1, "name": b"x"}
    assert records.fields_of([99, 1]) is None


def test_a_frame_of_records_packs_as_each_record_alone():
    items = [r for r, _, _ in EXAMPLES]
    packed = msgpack.packb(records.encode_all(items), use_bin_type=True)
    assert packed == msgpack.packb([records.encode(r) for r in items], use_bin_type=True)
