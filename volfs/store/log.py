"""The append-only log of a volume: numbered segment files of frames.

This is the storage backend interface of a volume: frames go in at the end (``append``), data
parts come back by position (``read``), ``sync`` makes everything appended so far durable (and
``durable_mark`` says how far that was), and ``frames`` replays the log from a position.
Everything above it (the volume model, the FUSE operations) sees only positions
``(segment, offset)``; an object-store backend would keep segments as objects and offer the
same calls.

Each segment starts with a header frame naming the volume and the segment number, so a segment
copied from elsewhere or renamed is refused rather than replayed.

`SegmentReader` finds, replays and reads segments and reads the durable mark; it opens nothing
for writing.  `SegmentLog`, the writer a served volume uses, adds appending, syncing, the mark,
punching holes and removing segments on top of it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import struct
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import xxhash

from volfs.store import frame

logger = logging.getLogger(__name__)

SEGMENT_PREFIX = "seg-"
SEGMENT_SUFFIX = ".log"
SEGMENT_KIND = "volfs-segment"
#: Holds the log position up to which a sync completed: ``u64 seg | u64 pos | u64 xxh3``.
DURABLE_MARK = "durable"
_MARK = struct.Struct("<QQQ")
#: Open segment files kept for reading; older ones are closed and reopened on demand.
MAX_OPEN_SEGMENTS = 256
OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC
#: Unit of the holes `SegmentLog.punch` makes: file systems free whole blocks only.
PUNCH_ALIGN = 4096
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
#: A sync that made fewer bytes durable than this (a database's commit, say) leaves zeros
#: written ahead of the head, `PREFILL` bytes of them, so that the next small syncs overwrite
#: blocks the file system has already allocated and recorded: an fdatasync then flushes data
#: only, without a journal commit for a grown file (ext4: about half the time).
PREFILL_TRIGGER = 64 * 1024
PREFILL = 256 * 1024
#: Small syncs in a row before zeros are written ahead: a volume that is created, or synced
#: now and then, holds none (an idle volume costs no disk for them).
PREFILL_AFTER = 3
#: libc, for the calls Python's os module lacks (fallocate here, prctl in volume.py).
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class Position(NamedTuple):
    seg: int
    pos: int


class LogFrame(NamedTuple):
    """A frame found while replaying the log."""

    at: Position  #: where the frame starts
    end: Position  #: where the next frame starts
    meta: object
    data_pos: int
    data_len: int


class LogDamage(Exception):
    """A frame that failed its checksum, with where it is."""

    def __init__(self, at: Position, reason: str) -> None:
        super().__init__(f"segment {at.seg} offset {at.pos}: {reason}")
        self.at = at
        self.reason = reason


def segment_name(seg: int) -> str:
    return f"{SEGMENT_PREFIX}{seg:08d}{SEGMENT_SUFFIX}"


class SegmentReader:
    """Find, replay and read the segment files of one volume's log; writes nothing."""

    def __init__(self, dir_fd: int, volume_id: str, segment_size: int) -> None:
        self._dir_fd = dir_fd
        self._volume_id = volume_id
        self.segment_size = segment_size
        self._fds: dict[int, int] = {}
        self.segments: list[int] = sorted(self._list_segments())

    def _list_segments(self) -> Iterator[int]:
        for name in os.listdir(self._dir_fd):
            if name.startswith(SEGMENT_PREFIX) and name.endswith(SEGMENT_SUFFIX):
                number = name[len(SEGMENT_PREFIX) : -len(SEGMENT_SUFFIX)]
                if number.isdigit():
                    yield int(number)

    def _fd(self, seg: int) -> int:
        """The open file of segment *seg* (FileNotFoundError if it is gone)."""
        fd = self._fds.get(seg)
        if fd is None:
            if len(self._fds) >= MAX_OPEN_SEGMENTS:
                os.close(self._fds.pop(self._fd_to_close()))
            fd = self._open_segment(seg)
            self._fds[seg] = fd
        return fd

    def _fd_to_close(self) -> int:
        return next(iter(self._fds))

    def _open_segment(self, seg: int) -> int:
        return os.open(segment_name(seg), os.O_RDONLY | OPEN_FLAGS, dir_fd=self._dir_fd)

    # -- replay -------------------------------------------------------------------------

    def frames(self, start: Position) -> Iterator[LogFrame]:
        """Yield every frame from *start* to the end of the log.

        Raises `LogDamage` at the first frame whose header or meta fails its checksum (or is
        cut short); what follows it cannot be located, so replay has to stop there.  Likewise
        at the end of a segment that stops short of the segment size while a later one exists.
        """
        last: Position | None = None  # the end of the segment replayed before
        for seg in self.segments:
            if seg < start.seg:
                continue
            if last is not None and (seg != last.seg + 1 or last.pos < self.segment_size):
                # A segment ends before the log moved on (segments start once the one before
                # reaches segment_size): its unsynced tail was lost while later segments reached
                # the disk.  What follows the gap never applies to what replay has seen.
                raise LogDamage(last, f"the log has a gap before segment {seg}")
            fd = self._fd(seg)
            size = os.fstat(fd).st_size
            pos = start.pos if seg == start.seg else 0
            if pos == 0:
                pos = self._check_segment_header(seg, fd, size)
            while pos < size:
                header = os.pread(fd, frame.HEADER.size, pos)
                at = Position(seg, pos)
                try:
                    meta_len, data_len, _ = frame.decode_header(header)
                    meta = frame.decode_meta(header, os.pread(fd, meta_len, pos + len(header)))
                except frame.FrameError as exc:
                    if self._prefilled(seg, fd, at, size):
                        size = pos
                        break
                    raise LogDamage(at, str(exc)) from None
                data_pos = pos + frame.HEADER.size + meta_len
                end = data_pos + data_len
                if end > size:
                    raise LogDamage(at, "data part cut short")
                yield LogFrame(at, Position(seg, end), meta, data_pos, data_len)
                pos = end
            last = Position(seg, size)

    def _prefilled(self, seg: int, fd: int, at: Position, size: int) -> bool:
        """Whether the log ends at *at*, followed by nothing but the zeros a sync wrote ahead
        (`PREFILL`): only in the last segment, and only past the durable mark, for zeros
        where synced frames were would be damage (a block lost), not the log's end."""
        if seg != self.segments[-1] or size - at.pos > 2 * PREFILL or at < self.durable_mark():
            return False
        return os.pread(fd, size - at.pos, at.pos).count(0) == size - at.pos

    def _check_segment_header(self, seg: int, fd: int, size: int) -> int:
        header = os.pread(fd, frame.HEADER.size, 0)
        at = Position(seg, 0)
        if not header and seg == self.segments[-1]:
            return 0  # created, then cut off before its header reached the disk
        try:
            meta_len, _, _ = frame.decode_header(header)
            meta = frame.decode_meta(header, os.pread(fd, meta_len, frame.HEADER.size))
        except frame.FrameError as exc:
            raise LogDamage(at, f"segment header: {exc}") from None
        if meta != [SEGMENT_KIND, self._volume_id, seg]:
            raise LogDamage(at, f"segment header names another segment or volume: {meta!r}")
        return frame.HEADER.size + meta_len

    # -- reading ----------------------------------------------------------------------

    def read(self, seg: int, pos: int, length: int) -> bytes:
        data = os.pread(self._fds.get(seg) or self._fd(seg), length, pos)
        if len(data) != length:
            raise LogDamage(Position(seg, pos), f"segment ends {length - len(data)} bytes early")
        return data

    def durable_mark(self) -> Position:
        """The last position a sync recorded as durable ((0, 0) if none, or if unreadable)."""
        try:
            fd = os.open(DURABLE_MARK, os.O_RDONLY | OPEN_FLAGS, dir_fd=self._dir_fd)
        except FileNotFoundError:
            return Position(0, 0)
        try:
            raw = os.pread(fd, _MARK.size, 0)
        finally:
            os.close(fd)
        if len(raw) != _MARK.size:
            return Position(0, 0)
        seg, pos, checksum = _MARK.unpack(raw)
        if xxhash.xxh3_64_intdigest(raw[:16]) != checksum:
            return Position(0, 0)
        return Position(seg, pos)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class SegmentLog(SegmentReader):
    """The log a served volume writes: append frames, sync them, punch and remove segments."""

    def __init__(self, dir_fd: int, volume_id: str, segment_size: int) -> None:
        super().__init__(dir_fd, volume_id, segment_size)
        self._dirty: set[int] = set()
        self._dir_dirty = False
        self._sealed_sizes: dict[int, int] = {}
        self._mark_fd: int | None = None
        self.failed: OSError | None = None  #: the error of a failed flush (see `fail`)
        self.head = Position(0, 0)  #: where the next frame goes; set by ``start_appending``
        self.total = 0  #: bytes in all segment files; set by ``start_appending``
        #: Told the seconds of each flush that synced anything (the worker's metrics).
        self.on_flush: Callable[[float], None] | None = None
        self._filled = 0  #: the head segment's file size: its frames, then zeros (`PREFILL`)
        self._synced_at = Position(0, 0)  #: the head at the last sync
        self._small_syncs = 0  #: syncs in a row of less than `PREFILL_TRIGGER` bytes

    def _fd_to_close(self) -> int:
        return next(s for s in self._fds if s != self.head.seg)

    def _open_segment(self, seg: int) -> int:
        return os.open(segment_name(seg), os.O_RDWR | OPEN_FLAGS, dir_fd=self._dir_fd)

    def _segment_header(self, seg: int) -> list[bytes]:
        return frame.encode([SEGMENT_KIND, self._volume_id, seg])

    def discard_after(self, at: Position) -> int:
        """Cut the log back to *at*, dropping later segments; return the bytes dropped."""
        dropped = 0
        for seg in [s for s in self.segments if s > at.seg]:
            dropped += os.stat(segment_name(seg), dir_fd=self._dir_fd).st_size
            self.remove_segment(seg)
        # Later segments must be gone for good before this one is cut short: a power cut
        # between the two would otherwise leave a short segment followed by the old next one,
        # whose records would replay after a hole.
        self.sync_names()
        if at.seg in self.segments:
            fd = self._fd(at.seg)
            dropped += max(0, os.fstat(fd).st_size - at.pos)
            os.ftruncate(fd, at.pos)
            os.fsync(fd)
        return dropped

    # -- appending ----------------------------------------------------------------------

    def start_appending(self, at: Position) -> None:
        """Continue the log at *at*, the end that replay found (``(0, 0)``: nothing found)."""
        self.discard_after(at)  # anything beyond the end replay found holds no valid frame
        # What replay found past the durable mark was written by a process that may have
        # died before syncing it, in segments whose names may not be durable yet: the first
        # sync must cover all of it, as the mark it then writes vouches for the log before it.
        mark = self.durable_mark()
        self._dirty.update(seg for seg in self.segments if seg >= mark.seg)
        self._dir_dirty = True
        if at.seg == 0:
            self._new_segment(1)
        elif at.seg not in self.segments:  # a clone's or a rolled-back volume's first segment
            self._new_segment(at.seg)
        elif at.pos == 0:
            end = self._write(self._fd(at.seg), self._segment_header(at.seg), 0)
            self.head = Position(at.seg, end)
            self._dirty.add(at.seg)
        else:
            self.head = at
        self._filled = self.head.pos  # `discard_after` cut the segment there
        self._synced_at = self.head
        self.total = sum(self.sizes().values())

    def _new_segment(self, seg: int) -> None:
        fd = os.open(
            segment_name(seg),
            os.O_RDWR | os.O_CREAT | os.O_EXCL | OPEN_FLAGS,
            0o600,
            dir_fd=self._dir_fd,
        )
        try:
            end = self._write(fd, self._segment_header(seg), 0)
        except OSError:  # a full disk, say: leave no headless segment behind
            os.close(fd)
            os.unlink(segment_name(seg), dir_fd=self._dir_fd)
            raise
        self._fds[seg] = fd
        self.segments.append(seg)
        self._dir_dirty = True
        self._dirty.add(seg)
        self.head = Position(seg, end)
        self._filled = end
        self.total += end

    @staticmethod
    def _write(fd: int, buffers: list[bytes], pos: int) -> int:
        """Write all of *buffers* at *pos*; on failure leave nothing of them behind."""
        total = sum(len(b) for b in buffers)
        try:
            done = os.pwritev(fd, buffers, pos)
            if done < total:  # rare: a signal or a nearly full disk; finish piece by piece
                rest = memoryview(b"".join(buffers))
                while done < total:
                    n = os.pwrite(fd, rest[done:], pos + done)
                    if n == 0:
                        raise OSError(errno.EIO, "store write made no progress")
                    done += n
        except OSError:
            try:
                os.ftruncate(fd, pos)
            except OSError:
                logger.exception("could not cut a failed frame off the log at offset %d", pos)
            raise
        return pos + total

    def append(self, meta_obj: object, data: bytes = b"") -> tuple[Position, int]:
        """Append one frame; return where it starts and where its data part starts."""
        return self.append_frame(frame.encode(meta_obj, data))

    def append_frame(self, buffers: list[bytes]) -> tuple[Position, int]:
        """Append one frame encoded by `frame.encode`; return as `append` does."""
        self.seal()
        seg, pos = self.head
        try:
            end = self._write(self._fds.get(seg) or self._fd(seg), buffers, pos)
        except OSError:
            self._filled = pos  # `_write` cut the file there, zeros ahead included
            raise
        self._filled = max(self._filled, end)
        self._dirty.add(seg)
        self.head = Position(seg, end)
        self.total += end - pos
        return Position(seg, pos), end - (len(buffers[2]) if len(buffers) > 2 else 0)

    def seal(self) -> None:
        """Start the next segment if the head segment has reached the segment size."""
        if self.head.pos >= self.segment_size:
            self._new_segment(self.head.seg + 1)

    def sync(self) -> Position:
        """Make every frame appended so far durable; return the durable end of the log.

        Afterwards the end is recorded in the durable-mark file (not synced itself: whatever
        value of it survives a crash was true when written, so it is a safe lower bound).
        Replay uses it to tell a torn tail, which holds nothing synced, from decay of data that
        was durable.  Being outside the log, the mark cannot be forged by file contents.
        """
        head = self.head
        self.flush()
        self._write_mark(head)
        small = head.seg == self._synced_at.seg and head.pos - self._synced_at.pos < PREFILL_TRIGGER
        self._small_syncs = self._small_syncs + 1 if small else 0
        if self._small_syncs >= PREFILL_AFTER:
            self._prefill()
        self._synced_at = head
        return head

    def _prefill(self) -> None:
        """Write zeros ahead of the head when few are left (`PREFILL`), up to the segment
        size; the next sync makes their allocation durable with its own data.  Only the
        server does this (a forked checkpoint writer only flushes: its head is behind the
        server's).  A disk too full for them is no failure: they are cut off again."""
        seg, pos = self.head
        if self._filled - pos >= PREFILL // 4 or pos >= self.segment_size:
            return
        start = max(self._filled, pos)
        end = min(pos + PREFILL, self.segment_size)
        fd = self._fds.get(seg) or self._fd(seg)
        try:
            os.pwrite(fd, bytes(end - start), start)
        except OSError:
            with contextlib.suppress(OSError):  # zeros left behind read as the log's end
                os.ftruncate(fd, pos)
            self._filled = pos
            return
        self._filled = end
        self._dirty.add(seg)

    def flush(self) -> None:
        """Make every frame appended so far durable, without recording the mark.

        Every segment, even one whose data is all dead: until a newer checkpoint is durable,
        replay runs from the old one through all the segments after it, and a hole in that
        sequence would cut off everything synced beyond it.

        A forked checkpoint writer calls this on its copy of the log's state: it flushes
        what was appended before the fork (and, harmlessly, whatever the server appended to
        the same files since), while the server's own record of what is synced stays as it
        was.  A mark written from here could go back behind one the server wrote meanwhile.
        """
        if self.failed is not None:
            raise OSError(errno.EIO, f"an earlier flush of the log failed ({self.failed})")
        if not self._dirty and not self._dir_dirty:
            return
        started = time.perf_counter()
        try:
            for seg in sorted(self._dirty):
                os.fdatasync(self._fd(seg))
                self._dirty.discard(seg)
            self.sync_names()
        except OSError as exc:
            self.fail(exc)
            raise
        if self.on_flush is not None:
            self.on_flush(time.perf_counter() - started)

    def fail(self, exc: OSError) -> None:
        """Record that a flush failed: from now on every flush and sync fails.

        The kernel reports a writeback error to one fsync per open file and then marks the
        pages clean: a later fsync would succeed although the data never reached the disk.
        So the failure sticks until the volume is opened again (replay then finds what the
        disk really holds, and checksums report what is damaged).
        """
        if self.failed is None:
            self.failed = exc

    def sync_names(self) -> None:
        """Make the segment files' creation and deletion durable."""
        if self._dir_dirty:
            os.fsync(self._dir_fd)
            self._dir_dirty = False

    def _write_mark(self, at: Position) -> None:
        if self._mark_fd is None:
            self._mark_fd = os.open(
                DURABLE_MARK, os.O_RDWR | os.O_CREAT | OPEN_FLAGS, 0o600, dir_fd=self._dir_fd
            )
        body = struct.pack("<QQ", at.seg, at.pos)
        os.pwrite(self._mark_fd, body + xxhash.xxh3_64_intdigest(body).to_bytes(8, "little"), 0)

    def sizes(self) -> dict[int, int]:
        """Bytes in each segment file (the head segment's up to the head)."""
        sizes = self._sealed_sizes
        for seg in self.segments:
            if seg not in sizes and seg != self.head.seg:
                sizes[seg] = os.fstat(self._fd(seg)).st_size  # sealed: it never changes again
        return {seg: self.head.pos if seg == self.head.seg else sizes[seg] for seg in self.segments}

    def shared(self, seg: int) -> bool:
        """Whether segment *seg* has other names than this log's: a snapshot's or a clone's
        (`volfs.store.history`).  Its blocks are theirs too, so it is never punched and
        compacting it would free nothing."""
        return os.fstat(self._fds.get(seg) or self._fd(seg)).st_nlink > 1

    def punch(self, seg: int, start: int, end: int) -> int:
        """Give the disk blocks under [start, end) of segment *seg* back to the file system.

        Only whole blocks go, and never the segment's header frame; the file keeps its size,
        so every position in the log stays what it was, and the range reads as zeros.  The
        caller must make sure nothing will read the range again.  Returns the bytes freed
        (an estimate: blocks that were holes already count too).
        """
        start = -(-max(start, self._header_size(seg)) // PUNCH_ALIGN) * PUNCH_ALIGN
        end = end // PUNCH_ALIGN * PUNCH_ALIGN
        if end <= start:
            return 0
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if libc.fallocate(self._fd(seg), mode, start, end - start) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"cannot punch a hole in segment {seg}: {os.strerror(code)}")
        return end - start

    def _header_size(self, seg: int) -> int:
        return sum(len(b) for b in self._segment_header(seg))

    def remove_segment(self, seg: int) -> None:
        fd = self._fds.pop(seg, None)
        if fd is not None:
            self.total -= os.fstat(fd).st_size
            os.close(fd)
        else:
            self.total -= os.stat(segment_name(seg), dir_fd=self._dir_fd).st_size
        os.unlink(segment_name(seg), dir_fd=self._dir_fd)
        self.segments.remove(seg)
        self._sealed_sizes.pop(seg, None)
        self._dirty.discard(seg)
        self._dir_dirty = True

    def close(self) -> None:
        super().close()
        if self._mark_fd is not None:
            os.close(self._mark_fd)
            self._mark_fd = None
