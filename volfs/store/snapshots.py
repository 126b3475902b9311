"""Snapshots of a volume on disk: taken from a loaded volume, found, read and removed.

A snapshot is the whole state of a volume at one instant between two operations, kept in the
volume's directory as ``snapshots/SNAP/``::

    snapshot     one frame: {kind: "volfs-snapshot", format, name (SNAP), volume (NAME),
                 volume_id, id (uuid), created_ns, used, inodes}
    checkpoint   the state, as a checkpoint (journal.py) covering the log up to (S + 1, 0),
                 S the volume's last segment then: a load replays nothing after it
    seg-N.log    a hard link to each segment the state has data in

It costs metadata, not data: the log is never rewritten in place, so a segment's file holds
what the snapshot needs for as long as the snapshot names it.  A segment with more than one
name (a volume's and its snapshots' or clones', `SegmentLog.shared`) is never punched or
compacted by anyone; each holder only ever removes its own name, and the file system frees
the blocks with the last one.  So nobody owns shared data and nobody frees it: the last name
does.  ARCHITECTURE.md ("Snapshots and clones") says why.

Readers of a snapshot (a mount of it, a clone or an export made from it) hold a shared flock
on its ``snapshot`` file; removing it needs the lock exclusively, so a snapshot in use is never
removed.  A snapshot is made in ``snapshots/.taking-SNAP-XXXXXXXX`` and renamed into place once
all of it is durable, and removed by renaming it to ``.removing-...`` first: a crash leaves a
hidden directory, never a half snapshot.  The next take sweeps either kind; the next removal or
listing sweeps what a removal left (a take under way is only the volume's lock holder's to
sweep).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from volfs.errors import ErrorCode, StoreError
from volfs.store import frame, headers, journal
from volfs.store.checkpoints import state_records
from volfs.store.headers import FILE_FLAGS, check_name
from volfs.store.log import OPEN_FLAGS, SEGMENT_PREFIX, SEGMENT_SUFFIX, Position, segment_name
from volfs.store.records import FORMAT

if TYPE_CHECKING:
    from volfs.store.volume import Volume

SNAPSHOTS_DIR = "snapshots"
SNAPSHOT_FILE = "snapshot"
SNAPSHOT_KIND = "volfs-snapshot"
#: Hidden entries of ``snapshots/``: a snapshot being taken, or being removed.
TAKING_PREFIX = ".taking-"
REMOVING_PREFIX = ".removing-"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | OPEN_FLAGS


def parse_name(text: str) -> tuple[str, str]:
    """``NAME@SNAP`` as (NAME, SNAP), each checked by the volume name rules."""
    name, at, snap = text.partition("@")
    if not at:
        raise StoreError(
            f"{text[:80]!r} names no snapshot: write VOLUME@SNAPSHOT", ErrorCode.INVALID
        )
    check_name(name)
    if not headers.NAME_PATTERN.fullmatch(snap):
        raise StoreError(
            f"invalid snapshot name {snap[:80]!r}: use 1-63 characters of a-z, 0-9, '_', '.', "
            "'-', starting with a letter or digit",
            ErrorCode.INVALID,
        )
    return name, snap


def check_target(text: str) -> str:
    """*text* if it names a volume (NAME) or a snapshot of one (NAME@SNAP) by the name rules."""
    if "@" in text:
        parse_name(text)
        return text
    return check_name(text)


def open_dir(volume_fd: int, create: bool = False) -> int | None:
    """The volume's ``snapshots/`` directory, open (None if it has none and *create* is off)."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(SNAPSHOTS_DIR, 0o700, dir_fd=volume_fd)
            os.fsync(volume_fd)
    try:
        return os.open(SNAPSHOTS_DIR, _DIR_FLAGS, dir_fd=volume_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            path = headers.fd_path(volume_fd) / SNAPSHOTS_DIR
            raise StoreError(
                f"{path} is not a directory: volfs follows no links in its store; move it away"
            ) from None
        raise


def names(snaps_fd: int) -> list[str]:
    """The snapshots in ``snapshots/`` (directories with a snapshot file), sorted by name."""
    found = []
    with os.scandir(snaps_fd) as entries:
        for entry in entries:
            if headers.NAME_PATTERN.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
                found.append(entry.name)
    return sorted(found)


def sweep(snaps_fd: int, taking: bool = True) -> None:
    """Remove what an interrupted removal left and, with *taking*, what an interrupted take
    left: only the volume's lock holder may (it alone takes snapshots), else a take under way
    would lose its staging directory.  A removal's leftovers anyone may sweep: the snapshot is
    gone already, and two sweepers only find each other's files gone."""
    prefixes = (TAKING_PREFIX, REMOVING_PREFIX) if taking else (REMOVING_PREFIX,)
    with os.scandir(snaps_fd) as entries:
        hidden = [e.name for e in entries if e.name.startswith(prefixes)]
    for name in hidden:
        _remove_tree(snaps_fd, name)


def _remove_tree(parent_fd: int, name: str) -> None:
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        return
    try:
        for entry in os.listdir(fd):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry, dir_fd=fd)
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(name, dir_fd=parent_fd)


def open_snapshot(snaps_fd: int, volume: str, snap: str) -> int:
    """The directory of snapshot *snap* of *volume*, open; NOT_FOUND if there is none."""
    try:
        return os.open(snap, _DIR_FLAGS, dir_fd=snaps_fd)
    except FileNotFoundError:
        raise StoreError(f"no such snapshot: {volume}@{snap}", ErrorCode.NOT_FOUND) from None
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            raise StoreError(
                f"snapshot {volume}@{snap}: {headers.fd_path(snaps_fd) / snap} is not a "
                "directory: move it out of the store"
            ) from None
        raise


def read_header(snap_fd: int, label: str) -> dict[str, Any]:
    """The ``snapshot`` file of the snapshot open at *snap_fd*; *label* (NAME@SNAP) names it."""
    try:
        fd = os.open(SNAPSHOT_FILE, os.O_RDONLY | FILE_FLAGS, dir_fd=snap_fd)
    except FileNotFoundError:
        raise StoreError(f"snapshot {label} has no header file", ErrorCode.DAMAGED) from None
    path = str(headers.fd_path(snap_fd) / SNAPSHOT_FILE)
    return headers.read_kind(fd, f"snapshot {label}: its header", path, SNAPSHOT_KIND)


def hold(snap_fd: int, label: str, exclusive: bool = False) -> int:
    """An fd of the snapshot's header holding its flock: shared for readers (a mount, a clone,
    an export), exclusive for removal; BUSY if that cannot be had now."""
    fd = os.open(SNAPSHOT_FILE, os.O_RDONLY | FILE_FLAGS, dir_fd=snap_fd)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(
            f"snapshot {label} is in use (mounted, or being cloned or exported): "
            "unmount it or wait, then try again",
            ErrorCode.BUSY,
        ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_held(snaps_fd: int, volume: str, snap: str) -> tuple[int, int]:
    """The directory of snapshot *snap* of *volume*, open, and an fd holding its shared lock
    (`hold`); NOT_FOUND if there is none.

    A removal renames the snapshot away before it lets its exclusive lock go, so a snapshot
    still at its name once the shared lock is held is whole, and stays so until the lock is
    let go; one renamed (or replaced) between the open and the lock is not found, and its
    files, which the removal is deleting, are never read."""
    label = f"{volume}@{snap}"
    snap_fd = open_snapshot(snaps_fd, volume, snap)
    try:
        try:
            held = hold(snap_fd, label)
        except FileNotFoundError:  # its header already deleted by the removal
            raise StoreError(f"no such snapshot: {label}", ErrorCode.NOT_FOUND) from None
        try:
            named = os.stat(snap, dir_fd=snaps_fd, follow_symlinks=False)
        except FileNotFoundError:
            named = None
        opened = os.fstat(snap_fd)
        if named is None or (named.st_dev, named.st_ino) != (opened.st_dev, opened.st_ino):
            os.close(held)
            raise StoreError(f"no such snapshot: {label}", ErrorCode.NOT_FOUND)
    except BaseException:
        os.close(snap_fd)
        raise
    return snap_fd, held


def segments(snap_fd: int) -> Iterator[tuple[int, os.stat_result]]:
    """(number, stat) of each segment file the snapshot names."""
    for name in os.listdir(snap_fd):
        if name.startswith(SEGMENT_PREFIX) and name.endswith(SEGMENT_SUFFIX):
            number = name[len(SEGMENT_PREFIX) : -len(SEGMENT_SUFFIX)]
            if number.isdigit():
                yield int(number), os.stat(name, dir_fd=snap_fd, follow_symlinks=False)


def link_segments(src_fd: int, dst_fd: int, numbers: Iterator[int] | list[int]) -> None:
    """Give each segment *numbers* of directory *src_fd* a name in *dst_fd* (a hard link)."""
    for seg in numbers:
        name = segment_name(seg)
        os.link(name, name, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)


class _Staging:
    """A snapshot being made in ``snapshots/.taking-SNAP-*`` of the volume at *volume_fd*
    (its lock held): `publish` makes it whole under its name; leaving the ``with`` block
    without that removes what was made."""

    def __init__(self, volume_fd: int, label: str, snap: str) -> None:
        self.label, self.snap = label, snap
        snaps_fd = open_dir(volume_fd, create=True)
        assert snaps_fd is not None
        self.snaps_fd = snaps_fd
        self.fd = -1
        try:
            if _exists(snaps_fd, snap):
                raise StoreError(f"snapshot {label} exists already", ErrorCode.EXISTS)
            sweep(snaps_fd)
            self.name = f"{TAKING_PREFIX}{snap}-{uuid.uuid4().hex[:8]}"
            os.mkdir(self.name, 0o700, dir_fd=snaps_fd)
            self.fd = os.open(self.name, _DIR_FLAGS, dir_fd=snaps_fd)
        except BaseException:
            self.close()
            raise

    def publish(self, header: dict[str, Any]) -> None:
        """Write its header durably, then give it its name (and make that durable)."""
        journal.write_durably(self.fd, SNAPSHOT_FILE, b"".join(frame.encode(header)))
        journal.rename_noreplace(self.snaps_fd, self.name, self.snap)
        os.fsync(self.snaps_fd)
        self.name = ""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if getattr(self, "name", ""):
            _remove_tree(self.snaps_fd, self.name)
        os.close(self.snaps_fd)

    def __enter__(self) -> _Staging:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def new_header(
    volume: dict[str, Any], snap: str, used: int, inodes: int, live: dict[int, int] | None
) -> dict[str, Any]:
    """The ``snapshot`` file of snapshot *snap* of the volume whose header is *volume*."""
    header = {
        "kind": SNAPSHOT_KIND,
        "format": FORMAT,
        "name": snap,
        "volume": volume["name"],
        "volume_id": volume["id"],
        "id": str(uuid.uuid4()),
        "created_ns": time.time_ns(),
        "used": used,
        "inodes": inodes,
    }
    if live is not None:  # what `ls` tells the bytes only it keeps alive by
        header["live"] = live
    return header


def take(volume: Volume, snap: str) -> dict[str, Any]:
    """Snapshot *volume* (loaded, its lock held) as *snap*, now; return the snapshot's header.

    Runs between two operations (nothing else changes the volume meanwhile), so the snapshot
    is one instant of it.  It returns once the snapshot is durable: the log it points into is
    synced first, then its links, checkpoint and header, then its name.  A worker runs the
    same two steps with the second in a forked child (`begin_take`, `write_taken`).
    """
    staging, header = begin_take(volume, snap)
    try:
        write_taken(volume, staging, header)
    finally:
        staging.close()
    volume.space.refresh_shared()
    return header


def begin_take(volume: Volume, snap: str) -> tuple[_Staging, dict[str, Any]]:
    """The first step of `take`, fast and in the serving process: the log synced, the
    snapshot's directory made and its segments linked (from here on the volume never
    punches or compacts them), and its header; the caller closes the staging."""
    staging = _Staging(volume.dir_fd, f"{volume.name}@{snap}", snap)
    try:
        volume.sync()  # the data it names must be durable before it is
        upgrade_format(volume)
        link_segments(volume.dir_fd, staging.fd, sorted(s for s, n in volume.live.items() if n))
        header = new_header(volume.header, snap, volume.used_by_files, volume.inodes_used,
                            headers.live_of(volume.live))  # fmt: skip
    except BaseException:
        staging.close()
        raise
    return staging, header


def write_taken(volume: Volume, staging: _Staging, header: dict[str, Any]) -> None:
    """The second step of `take`: the state as the snapshot's checkpoint, then its header
    and name.  A forked child runs it on its copy-on-write image of the state, which is the
    state at the fork, while the server goes on."""
    journal.write_checkpoint(
        staging.fd, state_records(volume, Position(volume.log.head.seg + 1, 0))
    )
    staging.publish(header)


def take_at_rest(volume_fd: int, header: dict[str, Any], snap: str) -> dict[str, Any] | None:
    """Snapshot the volume at *volume_fd* (its lock held, nobody serving it) without loading
    it, if its checkpoint covers its whole log (a clean unmount leaves it so) and its usage
    file says which segments it uses; None if not (the caller loads it and calls `take`).

    The snapshot's checkpoint is the volume's, its position moved past the log's last segment
    (`journal.copy_checkpoint`: the first frame re-encoded, the rest copied as bytes), so it
    costs a copy of the checkpoint, not a load of the volume."""
    covers = journal.checkpoint_position(volume_fd)
    usage, live = headers.read_usage(volume_fd), headers.read_live(volume_fd)
    numbers = sorted(seg for seg, _ in segments(volume_fd))
    if covers is None or live is None or "used" not in usage:
        return None
    if any(seg > covers.seg for seg in numbers) or not set(live) <= set(numbers):
        return None
    if covers.seg in numbers:
        size = os.stat(segment_name(covers.seg), dir_fd=volume_fd).st_size
        if size != covers.pos:
            return None  # frames after the checkpoint: only a load knows where they end
    label = f"{header['name']}@{snap}"
    with _Staging(volume_fd, label, snap) as staging:
        if header.get("format") != FORMAT:
            header = {**header, "format": FORMAT}
            journal.write_durably(volume_fd, headers.HEADER_FILE, b"".join(frame.encode(header)))
        link_segments(volume_fd, staging.fd, sorted(live))
        journal.copy_checkpoint(volume_fd, staging.fd, Position(max(numbers, default=0) + 1, 0))
        taken = new_header(header, snap, usage["used"], usage.get("inodes", 0), live)
        staging.publish(taken)
    return taken


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def upgrade_format(volume: Volume) -> None:
    """Give a volume of format 1 the format of shared segments (2) in its header: a volfs of
    format 1 would punch the blocks its snapshots share.  Nothing else changes."""
    if volume.header.get("format") == FORMAT:
        return
    header = {**volume.header, "format": FORMAT}
    journal.write_durably(volume.dir_fd, headers.HEADER_FILE, b"".join(frame.encode(header)))
    volume.header = header


def remove(snaps_fd: int, volume: str, snap: str) -> None:
    """Remove snapshot *snap* of *volume*; BUSY while a reader holds it."""
    label = f"{volume}@{snap}"
    snap_fd = open_snapshot(snaps_fd, volume, snap)
    try:
        held = hold(snap_fd, label, exclusive=True)
    finally:
        os.close(snap_fd)
    try:
        doomed = f"{REMOVING_PREFIX}{snap}-{uuid.uuid4().hex[:8]}"
        os.rename(snap, doomed, src_dir_fd=snaps_fd, dst_dir_fd=snaps_fd)
        os.fsync(snaps_fd)  # gone as a whole: what follows only gives the space back
    finally:
        os.close(held)
    sweep(snaps_fd, taking=False)  # this removal's directory, and any a killed one left


def check_removable(name: str, volume_fd: int, recursive: bool) -> None:
    """Refuse to remove volume *name* while it has snapshots (unless *recursive*) or while one
    of them is in use; its lock is held, so no snapshot is taken meanwhile."""
    snaps_fd = open_dir(volume_fd)
    if snaps_fd is None:
        return
    try:
        found = names(snaps_fd)
        if found and not recursive:
            raise StoreError(
                f"volume {name} has {len(found)} snapshot(s) ({', '.join(found[:3])}"
                f"{', ...' if len(found) > 3 else ''}): remove them first, or use -r to "
                "remove them with it",
                ErrorCode.BUSY,
            )
        for snap in found:  # each must be free before any goes (a mount of it, a clone)
            snap_fd = open_snapshot(snaps_fd, name, snap)
            try:
                os.close(hold(snap_fd, f"{name}@{snap}", exclusive=True))
            finally:
                os.close(snap_fd)
    finally:
        os.close(snaps_fd)


class _Holder(NamedTuple):
    """One name of a volume's segment files: the volume's own directory, or a snapshot's."""

    segments: dict[int, os.stat_result]  #: number -> its file
    live: dict[int, int] | None  #: number -> bytes in use then (None: not known)
    extra: int  #: disk bytes of its own besides segments (a snapshot's checkpoint)


def _holders(volume_fd: int, snap_fds: dict[str, int]) -> tuple[_Holder, dict[str, _Holder]]:
    own = _Holder(dict(segments(volume_fd)), headers.read_live(volume_fd), 0)
    taken = {}
    for snap, fd in snap_fds.items():
        try:
            live = headers.live_map(read_header(fd, snap).get("live"))
        except StoreError:
            live = None
        extra = 0
        with contextlib.suppress(FileNotFoundError):
            extra = os.stat(journal.CHECKPOINT_FILE, dir_fd=fd).st_blocks * 512
        taken[snap] = _Holder(dict(segments(fd)), live, extra)
    return own, taken


def _names(own: _Holder, taken: dict[str, _Holder]) -> dict[int, int]:
    """For each segment file (by inode), how many of these holders name it."""
    names: dict[int, int] = {}
    for holder in (own, *taken.values()):
        for st in holder.segments.values():
            names[st.st_ino] = names.get(st.st_ino, 0) + 1
    return names


def held_bytes(volume_fd: int, snap_fds: dict[str, int]) -> dict[str, int]:
    """For each snapshot *snap_fds* (name -> its directory) of the volume in *volume_fd*, the
    bytes only it keeps alive: what removing it gives back, at once or by compaction.

    A segment file only it names counts whole.  Of one it shares with the volume or with
    other snapshots, the bytes it used beyond what the others use: in a sealed segment the
    data in use only ever shrinks, so the holders' data there nest (the older the more) and
    the difference is exact; in the segment that was the log's head it may count short.  A
    segment a clone names too counts nothing: what the clone uses of it is not known here.
    """
    own, taken = _holders(volume_fd, snap_fds)
    names = _names(own, taken)
    held = {}
    for snap, holder in taken.items():
        total = holder.extra
        for seg, st in holder.segments.items():
            if st.st_nlink == 1:
                total += st.st_blocks * 512
                continue
            if st.st_nlink > names[st.st_ino] or holder.live is None:
                continue  # a clone's too, or what it used is not known
            others = [
                other.live.get(seg, 0) if other.live is not None else None
                for other in (own, *taken.values())
                if other is not holder and seg in other.segments
                and other.segments[seg].st_ino == st.st_ino
            ]  # fmt: skip
            if None not in others:
                rest = max((n for n in others if n is not None), default=0)
                total += max(0, holder.live.get(seg, 0) - rest)
        held[snap] = total
    return held


def only_in_snapshots(volume_fd: int, snap_fds: dict[str, int]) -> int:
    """The bytes of the volume in *volume_fd* that only its snapshots keep alive (not the
    volume itself, not a clone), their checkpoints included; counted as `held_bytes` does."""
    own, taken = _holders(volume_fd, snap_fds)
    names = _names(own, taken)
    total = sum(holder.extra for holder in taken.values())
    seen: set[int] = set()
    for holder in taken.values():
        for seg, st in holder.segments.items():
            if st.st_ino in seen or st.st_nlink > names[st.st_ino]:
                continue  # counted, or a clone's too
            seen.add(st.st_ino)
            mine = own.segments.get(seg)
            if mine is None or mine.st_ino != st.st_ino:
                total += st.st_blocks * 512  # the volume let it go: the snapshots' alone
                continue
            lives = [
                other.live.get(seg, 0)
                for other in taken.values()
                if other.live is not None and seg in other.segments
                and other.segments[seg].st_ino == st.st_ino
            ]  # fmt: skip
            if own.live is not None and lives:
                total += max(0, max(lives) - own.live.get(seg, 0))
    return total
