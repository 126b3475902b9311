"""Checkpoint files, and replacing a small file of a volume directory durably.

A checkpoint is frames whose meta parts are lists of records (`volfs.store.records`; their
layout is specified in ARCHITECTURE.md, "Records" and "Checkpoint"), written to
``checkpoint.tmp``, fsynced, renamed over ``checkpoint`` and the directory fsynced.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable, Iterator

from volfs.store import frame, records
from volfs.store.log import Position
from volfs.store.records import CHECKPOINT, CheckpointRecord, RawRecord

CHECKPOINT_FILE = "checkpoint"
_CHECKPOINT_TMP = "checkpoint.tmp"
#: Records per checkpoint frame: big enough to amortise the header, small enough to decode.
RECORDS_PER_FRAME = 4096
_RENAME_NOREPLACE = 1
_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
]


class CheckpointDamage(Exception):
    pass


def write_checkpoint(dir_fd: int, records: Iterable[RawRecord]) -> int:
    """Write *records* as the volume's checkpoint, atomically and durably; return its size."""
    fd = os.open(
        _CHECKPOINT_TMP,
        os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=dir_fd,
    )
    size = 0
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20, closefd=False) as out:
            batch: list[RawRecord] = []
            for record in records:
                batch.append(record)
                if len(batch) == RECORDS_PER_FRAME:
                    size += sum(out.write(b) for b in frame.encode(batch))
                    batch = []
            if batch:
                size += sum(out.write(b) for b in frame.encode(batch))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(_CHECKPOINT_TMP, CHECKPOINT_FILE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)
    return size


def write_durably(dir_fd: int, name: str, data: bytes) -> None:
    """Replace file *name* in the directory by *data*, atomically and durably."""
    tmp = name + ".tmp"
    fd = os.open(
        tmp,
        os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=dir_fd,
    )
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)


def rename_noreplace(dir_fd: int, old: str, new: str) -> None:
    """Rename *old* to *new* in *dir_fd*, refused with FileExistsError if *new* exists
    (rename(2) would replace an empty directory there)."""
    if _libc.renameat2(dir_fd, old.encode(), dir_fd, new.encode(), _RENAME_NOREPLACE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), new)


def checkpoint_position(dir_fd: int) -> Position | None:
    """The log position the checkpoint in *dir_fd* covers (its first record's); None if there
    is no checkpoint or its first frame does not read as one."""
    try:
        fd = os.open(CHECKPOINT_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        first = _first_frame(fd)
    finally:
        os.close(fd)
    if first is None:
        return None
    covers = records.decode(first[0][0])
    return Position(covers.segment, covers.offset) if type(covers) is CheckpointRecord else None


def _first_frame(fd: int) -> tuple[list[RawRecord], int] | None:
    """The records of the checkpoint's first frame and its length; None if unreadable."""
    header = os.pread(fd, frame.HEADER.size, 0)
    try:
        meta_len, data_len, _ = frame.decode_header(header)
        batch = frame.decode_meta(header, os.pread(fd, meta_len, frame.HEADER.size))
    except frame.FrameError:
        return None
    if data_len or not isinstance(batch, list) or not batch or batch[0][:1] != [CHECKPOINT]:
        return None
    return batch, frame.HEADER.size + meta_len


def copy_checkpoint(src_fd: int, dst_fd: int, covers: Position) -> None:
    """Write the checkpoint of directory *src_fd* as the checkpoint of *dst_fd*, covering the
    log up to *covers* instead: its first frame re-encoded, the others copied byte for byte."""
    src = os.open(CHECKPOINT_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_fd)
    try:
        first = _first_frame(src)
        if first is None:
            raise CheckpointDamage("the checkpoint's first frame does not read as one")
        batch, length = first
        old = records.decode(batch[0])
        assert type(old) is CheckpointRecord
        batch[0] = records.encode(old._replace(segment=covers.seg, offset=covers.pos))
        dst = os.open(_CHECKPOINT_TMP, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                      | os.O_CLOEXEC, 0o600, dir_fd=dst_fd)  # fmt: skip
        try:
            os.write(dst, b"".join(frame.encode(batch)))
            left, offset = os.fstat(src).st_size - length, length
            while left > 0:
                done = os.copy_file_range(src, dst, left, offset)
                if done == 0:
                    raise CheckpointDamage("the checkpoint ended while being copied")
                left, offset = left - done, offset + done
            os.fsync(dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)
    os.rename(_CHECKPOINT_TMP, CHECKPOINT_FILE, src_dir_fd=dst_fd, dst_dir_fd=dst_fd)
    os.fsync(dst_fd)


def read_checkpoint(dir_fd: int) -> Iterator[RawRecord] | None:
    """The records of the volume's checkpoint, or None if it has none yet.

    Raises `CheckpointDamage` if any frame fails its checksum: a checkpoint was written and
    synced before it replaced the previous one, so damage here is never a torn write.
    """
    try:
        fd = os.open(CHECKPOINT_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    return _checkpoint_records(fd)


def _checkpoint_records(fd: int) -> Iterator[RawRecord]:
    with os.fdopen(fd, "rb", buffering=1 << 20) as src:
        offset = 0
        while header := src.read(frame.HEADER.size):
            try:
                meta_len, data_len, _ = frame.decode_header(header)
                batch = frame.decode_meta(header, src.read(meta_len))
            except frame.FrameError as exc:
                raise CheckpointDamage(f"checkpoint frame at offset {offset}: {exc}") from None
            if data_len or not isinstance(batch, list):
                raise CheckpointDamage(f"checkpoint frame at offset {offset} is not a record list")
            yield from batch
            offset += len(header) + meta_len
