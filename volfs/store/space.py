"""Space management of a served volume: compaction, reclaim by punching, the reserve, the bound.

`Space` decides when the log holds enough garbage to compact and which segment to take
(`compaction_victim`), copies live data out of it (`relocate`), gives the space of dead data
back in place on a full disk (`reclaim`), keeps the reserve file that makes room for the
checkpoint `reclaim` needs, and holds a sized volume's log within its bound (`make_room`).
ARCHITECTURE.md ("Why a log", "A full disk", "Disk use of a sized volume") says why.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from typing import TYPE_CHECKING

from volfs.errors import DataDamaged, NoSpace
from volfs.store import frame
from volfs.store.extents import CHUNK_SIZE, Extent
from volfs.store.records import WriteRecord

if TYPE_CHECKING:
    from volfs.store.volume import Volume

logger = logging.getLogger(__name__)

#: Compact once the log holds more dead bytes than live ones, and at least this many.
COMPACT_MIN_GARBAGE = 64 * 1024 * 1024
#: A file of this size kept in the volume directory, given up when the disk is full so that
#: the checkpoint which lets `reclaim` free space has room to be written.
RESERVE_FILE = "reserve"
RESERVE_SIZE = 8 * 1024 * 1024
#: Free dead data in place (`Space.reclaim`) when the disk has less free space than this and
#: at least RECLAIM_MIN bytes of dead data still take disk space.
RECLAIM_FREE_BELOW = 256 * 1024 * 1024
RECLAIM_MIN = 1024 * 1024
#: The largest frame an operation appends: a 1 MiB FUSE write with its meta part, with room
#: to spare (an xattr value is at most 64 KiB, a symlink target 4 KiB, names 255 bytes).
MAX_FRAME = CHUNK_SIZE + 64 * 1024
#: Segments of a sized volume: an eighth of its size, within these bounds.  The disk-use
#: bound of a sized volume is 2 x size + 2 segments + 4 MiB (`log_bound`).
MIN_SEGMENT_SIZE = 1024 * 1024
MAX_SEGMENT_SIZE = 64 * 1024 * 1024


def segment_size_for(size: int) -> int:
    """The segment size for a volume of *size* bytes (0: no size, the largest)."""
    if not size:
        return MAX_SEGMENT_SIZE
    return max(MIN_SEGMENT_SIZE, min(MAX_SEGMENT_SIZE, size // 8))


def log_bound(size: int, segment_size: int) -> int:
    """Most bytes the log of a volume of *size* (holding no more than that) ever takes."""
    return 2 * size + 2 * segment_size + 4 * 1024 * 1024


class Space:
    """Where one served volume's log takes disk space, and how it gives it back."""

    def __init__(self, volume: Volume) -> None:
        self._volume = volume
        self._unmovable: set[int] = set()  # segments holding damaged live data
        self._punched: dict[int, int] = {}  # segment -> its dead bytes when last punched
        #: Dead bytes of segments shared with snapshots or clones (`refresh_shared`): theirs
        #: to keep, so outside the bound of a sized volume's log.
        self.exempt = 0
        self.compacted = 0  #: live bytes compaction copied since the volume was opened

    def forget_segment(self, seg: int) -> None:
        """Segment *seg* was removed from the log."""
        self._punched.pop(seg, None)

    # -- compaction -------------------------------------------------------------------------

    def compaction_victim(self, min_garbage: int = COMPACT_MIN_GARBAGE) -> int | None:
        """The sealed segment most worth compacting, if the log holds enough garbage.

        Garbage is allowed to grow to the size of the live data (and at least *min_garbage*),
        so compaction costs at most one extra write of each live byte per such growth.
        """
        volume = self._volume
        sizes = self._own_sizes()
        if volume.quota:  # keeps housekeeping well ahead of `log_limit`
            live = volume.live_cost
            min_garbage = min(min_garbage, volume.log.segment_size)
        else:
            live = volume.used
        own_live = sum(volume.live.get(seg, 0) for seg in sizes)
        if sum(sizes.values()) - own_live < max(min_garbage, live):
            return None
        return self._victim(sizes)

    def _own_sizes(self) -> dict[int, int]:
        """`SegmentLog.sizes` of the segments only this log names (`SegmentLog.shared`)."""
        log = self._volume.log
        return {seg: size for seg, size in log.sizes().items() if not log.shared(seg)}

    def refresh_shared(self) -> None:
        """Count anew the dead bytes of shared segments (`exempt`): snapshots come and go,
        and files using data a snapshot shares are deleted."""
        volume = self._volume
        log = volume.log
        self.exempt = sum(
            max(0, size - volume.live.get(seg, 0))
            for seg, size in log.sizes().items()
            if log.shared(seg)
        )

    def _victim(self, sizes: dict[int, int]) -> int | None:
        """The sealed segment whose live data is the smallest part of it, if at most half.

        A sized volume measures live data by what moving it appends (`segment_cost`), as
        the bound of its disk use needs: a segment of small extents frees less when moved,
        as each extent takes a frame of its own.
        """
        volume = self._volume
        candidates = [
            s
            for s in sizes
            if s != volume.log.head.seg
            and s not in self._unmovable
            and sizes[s]
            and not volume.log.shared(s)
        ]
        if not candidates:
            return None

        def live(seg: int) -> int:
            return volume.segment_cost(seg) if volume.quota else volume.live.get(seg, 0)

        seg = min(candidates, key=lambda s: live(s) / sizes[s])
        return seg if live(seg) <= sizes[seg] // 2 else None

    def _live_extents(self) -> dict[int, list[tuple[int, Extent]]]:
        """(ino, extent) of every extent in use, by the segment its data lies in."""
        by_segment: dict[int, list[tuple[int, Extent]]] = {}
        for inode in self._volume.inodes.values():
            if inode.extents:
                for ext in inode.extents:
                    by_segment.setdefault(ext.frame.seg, []).append((inode.ino, ext))
        return by_segment

    def live_ranges(self) -> dict[int, list[tuple[int, int, int]]]:
        """(ino, start, length) of every extent in use, by the segment its data lies in; every
        segment of the log has an entry.  One scan of the whole volume (0.3 s at 1M files):
        compaction takes one per round, not one per segment."""
        ranges: dict[int, list[tuple[int, int, int]]] = {s: [] for s in self._volume.log.segments}
        for seg, extents in self._live_extents().items():
            ranges[seg] = [(ino, ext.start, ext.length) for ino, ext in extents]
        return ranges

    def relocate(self, ino: int, start: int, length: int, seg: int) -> None:
        """Copy what of [start, start+length) of *ino* still lies in *seg* to the log's head."""
        volume = self._volume
        inode = volume.inodes.get(ino)
        if inode is None or inode.extents is None:
            return
        for pos, n, fr, skip in list(inode.extents.pieces(start, start + length)):
            if fr is None or fr.seg != seg:
                continue
            try:
                data = volume._read_frame(inode, pos, fr, skip, n)
            except DataDamaged:
                self._unmovable.add(seg)  # keep it: reads must go on reporting the damage
                continue
            record = WriteRecord(ino, pos, n, frame.block_sums(data), None)
            volume.commit([record], data, compacting=True)
            self.compacted += n

    def check_room(self, charge: int, inodes: int = 0) -> None:
        """Refuse (ENOSPC) an operation that would take the volume past its size or its
        inode limit; before anything of it is journaled."""
        volume = self._volume
        if charge > 0 and volume.quota and volume.used_by_files + charge > volume.quota:
            raise NoSpace(errno.ENOSPC, f"volume {volume.name} is full")
        if inodes > 0 and volume.inode_limit and volume.inodes_used + inodes > volume.inode_limit:
            raise NoSpace(errno.ENOSPC, f"volume {volume.name} has no free inodes")

    # -- a sized volume's bound -------------------------------------------------------------

    @property
    def log_limit(self) -> int:
        """How far the log of a sized volume may grow before an append must wait for
        compaction (0: no limit).

        Room for a segment and two frames above twice what the volume holds: then the
        sealed segments hold more than twice the cost of their live data, so one of them is
        at most half live and compacting it frees at least half a segment.  Compaction
        in flight (housekeeping's victim and one compacted here, each at most half a segment
        and a frame) may append beyond it: `log_bound` includes that."""
        volume = self._volume
        if not volume.quota:
            return 0
        return 2 * max(volume.quota, volume.live_cost) + volume.log.segment_size + 2 * MAX_FRAME

    def make_room(self, length: int, needed: bool) -> None:
        """Compact until an append of *length* bytes keeps the log within `log_limit`.

        Housekeeping compacts in the background long before the limit; this catches a
        writer that outruns it.  If nothing can be compacted (damaged data that cannot be
        moved), a write or an operation that adds to the volume (*needed*) gets ENOSPC;
        other changes of metadata (a delete, a chmod) go ahead, so that space can always be
        given back.
        """
        volume = self._volume
        self.refresh_shared()
        while volume.log.total - self.exempt + length > self.log_limit:
            volume.log.seal()  # a full head segment: sealed now rather than at the next append
            seg = self._victim(volume.log.sizes())
            if seg is None:
                if needed:
                    raise NoSpace(
                        errno.ENOSPC, f"volume {volume.name}: its log cannot be compacted"
                    )
                return
            logger.debug("volume %s: log at its limit; compacting segment %d now", volume.name, seg)
            for ino, start, length_ in self.live_ranges()[seg]:
                self.relocate(ino, start, length_, seg)
            volume.checkpoint()  # deletes the segment, unless damaged data had to stay in it
            self.refresh_shared()

    # -- giving space back -------------------------------------------------------------------

    def reclaimable(self) -> int:
        """Bytes of dead data in the log that still take disk space (not yet punched)."""
        volume = self._volume
        return sum(
            max(0, size - volume.live.get(seg, 0) - self._punched.get(seg, 0))
            for seg, size in self._own_sizes().items()
        )

    @property
    def reclaim_due(self) -> bool:
        """Whether the disk is nearly full while dead data could give space back."""
        disk = self._volume.disk_stats()
        return (
            disk.f_bavail * disk.f_frsize < RECLAIM_FREE_BELOW and self.reclaimable() >= RECLAIM_MIN
        )

    def reclaim(self) -> int:
        """Give the disk space of every byte no file uses back to the file system, now.

        Compaction frees space by copying, and only once garbage is plentiful; this punches
        holes in place.  A checkpoint comes first: replay never reads the log before it, so
        every byte there outside a live extent may go (headers of dead frames too).  If the
        disk is too full for the checkpoint, the reserve file makes room for it.  Returns
        the bytes punched.
        """
        volume = self._volume
        try:
            volume.checkpoint()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            self._drop_reserve()
            volume.checkpoint()
        end = volume.checkpoint_at
        live = self._live_extents()
        sizes = volume.log.sizes()
        freed = 0
        for seg in [s for s in volume.log.segments if s <= end.seg]:
            if volume.log.shared(seg):  # its blocks are a snapshot's or a clone's too
                continue
            limit = end.pos if seg == end.seg else sizes[seg]
            starts = [(e.frame.pos + e.skip, e.length) for _, e in live.get(seg, ())]
            used = sorted((first, first + length) for first, length in starts)
            pos = 0
            for first, stop in [*used, (limit, limit)]:
                if first > pos:
                    freed += volume.log.punch(seg, pos, min(first, limit))
                pos = max(pos, stop)
                if pos >= limit:
                    break
            self._punched[seg] = sizes[seg] - volume.live.get(seg, 0)
        self.keep_reserve()
        logger.info("volume %s: gave %d bytes of dead data back to the disk", volume.name, freed)
        return freed

    def keep_reserve(self) -> None:
        """Make sure the reserve file exists (best effort: not on a full disk)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(RESERVE_FILE, flags, 0o600, dir_fd=self._volume.dir_fd)
        except OSError:
            return
        want = self.reserve_size
        try:
            size = os.fstat(fd).st_size
            if size < want:
                os.posix_fallocate(fd, 0, want)
            elif size > want:
                os.ftruncate(fd, want)
        except OSError:  # a part of it would only take space without being sure of room
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)

    @property
    def reserve_size(self) -> int:
        """The reserve must hold a checkpoint; a sized volume's is no larger than its size
        (`INODE_COST`), so a small volume needs no 8 MiB of it."""
        quota = self._volume.quota
        if quota:
            return min(RESERVE_SIZE, quota + RESERVE_SIZE // 8)
        return RESERVE_SIZE

    def _drop_reserve(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(RESERVE_FILE, dir_fd=self._volume.dir_fd)
        logger.warning("volume %s: the disk is full; using the reserve", self._volume.name)
