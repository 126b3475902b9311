"""The record codec: one typed tuple per record kind, and the msgpack lists they are stored as.

A log frame's meta part (and each checkpoint frame's) is a list of records; a record is a
msgpack array whose first element is its kind and whose other elements are the fields of the
tuple below, in order.  What each kind means, and which may appear where, is specified once,
in docs/ARCHITECTURE.md ("Records"); the classes here only give those fields names and types,
so that nothing else in volfs picks a field by its position.

`encode` and `decode` are exact inverses for every record a volume writes: the bytes on disk
are those of format 1.  `decode` does not check field types (replay's appliers fail with
LookupError, TypeError or ValueError on a record that does not fit the volume, as before).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple, TypeAlias, TypeVar

#: The format of a volume: of its header, its records and its checkpoint (ARCHITECTURE.md).
#: Format 2 adds that a segment may be shared with snapshots and clones (hard links), which
#: a reader of format 1 would punch; its records are those of format 1.
FORMAT = 2

INODE = 1
LINK = 2
UNLINK = 3
RENAME = 4
EXCHANGE = 5
WRITE = 6
XATTR = 7
# 8: not used
EXTENTS = 9
CHECKPOINT = 10

#: A record as msgpack decodes it: a list whose first element is the kind.
RawRecord: TypeAlias = list[Any]


class InodeRecord(NamedTuple):
    ino: int
    mode: int
    uid: int
    gid: int
    rdev: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    symlink_target: bytes | None


class LinkRecord(NamedTuple):
    parent: int
    name: bytes
    ino: int


class UnlinkRecord(NamedTuple):
    parent: int
    name: bytes


class RenameRecord(NamedTuple):
    old_parent: int
    old_name: bytes
    new_parent: int
    new_name: bytes


class ExchangeRecord(NamedTuple):
    parent_a: int
    name_a: bytes
    parent_b: int
    name_b: bytes


class WriteRecord(NamedTuple):
    ino: int
    offset: int
    length: int
    block_sums: list[int]
    mtime_ns: int | None  #: None: a relocation by the compactor, which changes no attribute


class XattrRecord(NamedTuple):
    ino: int
    name: bytes
    value: bytes | None  #: None removes the attribute


class StoredExtent(NamedTuple):
    """One element of an EXTENTS record's list."""

    start: int
    length: int
    skip: int
    segment: int
    data_offset: int
    frame_length: int
    block_sums: list[int]


class ExtentsRecord(NamedTuple):
    ino: int
    extents: list[StoredExtent]

    def encode(self) -> RawRecord:
        return [EXTENTS, self.ino, [list(e) for e in self.extents]]


class CheckpointRecord(NamedTuple):
    format: int
    segment: int
    offset: int
    next_ino: int


Record: TypeAlias = (
    InodeRecord
    | LinkRecord
    | UnlinkRecord
    | RenameRecord
    | ExchangeRecord
    | WriteRecord
    | XattrRecord
    | ExtentsRecord
    | CheckpointRecord
)

#: The kind of each record class, and the class of each kind.
KIND_OF: dict[type[Record], int] = {
    InodeRecord: INODE,
    LinkRecord: LINK,
    UnlinkRecord: UNLINK,
    RenameRecord: RENAME,
    ExchangeRecord: EXCHANGE,
    WriteRecord: WRITE,
    XattrRecord: XATTR,
    ExtentsRecord: EXTENTS,
    CheckpointRecord: CHECKPOINT,
}
KINDS: dict[int, type[Record]] = {kind: cls for cls, kind in KIND_OF.items()}
#: kind -> (class, number of fields), for `decode`.
_DECODE = {kind: (cls, len(cls._fields)) for kind, cls in KINDS.items()}
_T = TypeVar("_T", bound=tuple[Any, ...])
_new_tuple = tuple.__new__


def encode(record: Record) -> RawRecord:
    """The msgpack list that stores *record*."""
    if type(record) is ExtentsRecord:
        return record.encode()
    return [KIND_OF[type(record)], *record]


def decode(raw: Any) -> Record:
    """The record stored as *raw*; ValueError if it is not a record of a known kind, TypeError
    if it has the wrong number of fields.  (Replay does not decode: its appliers unpack the
    stored fields, in the order of these classes; see `volfs.store.state`.)"""
    try:
        cls, count = _DECODE[raw[0]]
    except (LookupError, TypeError):  # not a list, empty, or an unknown kind
        raise ValueError(f"not a record of a known kind: {raw!r}") from None
    fields: list[Any] = raw[1:]
    if len(fields) != count:
        raise TypeError(f"{cls.__name__} has {count} fields, not {len(fields)}")
    if cls is ExtentsRecord:
        return ExtentsRecord(fields[0], [make(StoredExtent, e) for e in fields[1]])
    return make(cls, fields)


def make(cls: type[_T], fields: Iterable[Any]) -> _T:
    """A record of class *cls* with *fields*, unchecked (the count is the caller's to check):
    `tuple.__new__` without the generated ``__new__``'s Python frame, for replay and for the
    records every operation builds."""
    return _new_tuple(cls, fields)


def fields_of(raw: object) -> tuple[type[Record], dict[str, Any]] | None:
    """The class and the fields, by name, of a record read without its checksum (maybe
    garbled: fields may be missing or of any type); None if not even its kind is known."""
    if not isinstance(raw, list) or not raw or not isinstance(raw[0], int):
        return None
    cls = KINDS.get(raw[0])
    if cls is None:
        return None
    return cls, dict(zip(cls._fields, raw[1:], strict=False))


def encode_all(items: Iterable[Record]) -> list[RawRecord]:
    """*items* as a frame's meta part, ready for msgpack: the bytes of `encode` for each (an
    EXTENTS record's extents stay tuples, which msgpack packs as the same arrays)."""
    kind_of = KIND_OF
    return [[kind_of[type(r)], *r] for r in items]
