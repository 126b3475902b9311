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
import stat
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

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
    with os.fdopen(fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
            raise StoreError(f"snapshot {label}: its header is not a regular file")
        raw = src.read(1 << 16)
    try:
        header = headers.one_frame(raw)
    except frame.FrameError as exc:
        raise StoreError(
            f"snapshot {label}: its header file is damaged ({exc})", ErrorCode.DAMAGED
        ) from None
    if not isinstance(header, dict) or header.get("kind") != SNAPSHOT_KIND:
        raise StoreError(f"snapshot {label}: its header file is not a volfs snapshot header")
    return header


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


def take(volume: Volume, snap: str, now_ns: int | None = None) -> dict[str, Any]:
    """Snapshot *volume* (loaded, its lock held) as *snap*, now; return the snapshot's header.

    Runs between two operations (the worker's loop runs nothing else meanwhile), so the
    snapshot is one instant of the volume.  It returns once the snapshot is durable: the log
    it points into is synced first, then its links, checkpoint and header, then its name.
    """
    label = f"{volume.name}@{snap}"
    snaps_fd = open_dir(volume.dir_fd, create=True)
    assert snaps_fd is not None
    try:
        if _exists(snaps_fd, snap):
            raise StoreError(f"snapshot {label} exists already", ErrorCode.EXISTS)
        sweep(snaps_fd)
        volume.sync()  # the data it names must be durable before it is
        upgrade_format(volume)
        staging = f"{TAKING_PREFIX}{snap}-{uuid.uuid4().hex[:8]}"
        os.mkdir(staging, 0o700, dir_fd=snaps_fd)
        staging_fd = os.open(staging, _DIR_FLAGS, dir_fd=snaps_fd)
        try:
            link_segments(volume.dir_fd, staging_fd, sorted(s for s, n in volume.live.items() if n))
            journal.write_checkpoint(
                staging_fd, state_records(volume, Position(volume.log.head.seg + 1, 0))
            )
            header = {
                "kind": SNAPSHOT_KIND,
                "format": FORMAT,
                "name": snap,
                "volume": volume.name,
                "volume_id": volume.header["id"],
                "id": str(uuid.uuid4()),
                "created_ns": time.time_ns() if now_ns is None else now_ns,
                "used": volume.used_by_files,
                "inodes": volume.inodes_used,
            }
            journal.write_durably(staging_fd, SNAPSHOT_FILE, b"".join(frame.encode(header)))
        except BaseException:
            os.close(staging_fd)
            _remove_tree(snaps_fd, staging)
            raise
        os.close(staging_fd)
        journal.rename_noreplace(snaps_fd, staging, snap)
        os.fsync(snaps_fd)
    finally:
        os.close(snaps_fd)
    volume.space.refresh_shared()
    return header


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


def held_bytes(dir_fds: list[int]) -> dict[int, int]:
    """For each directory of *dir_fds* (snapshots of one volume), the disk bytes only it
    keeps alive: segments no other name holds, and its checkpoint."""
    held: dict[int, int] = {}
    for fd in dir_fds:
        total = 0
        for _, st in segments(fd):
            if st.st_nlink == 1:
                total += st.st_blocks * 512
        with contextlib.suppress(FileNotFoundError):
            total += os.stat(journal.CHECKPOINT_FILE, dir_fd=fd).st_blocks * 512
        held[fd] = total
    return held


def only_in_snapshots(dir_fds: list[int]) -> int:
    """Disk bytes of segments that the snapshots *dir_fds* of a volume hold and nothing else
    does (not the volume, not a clone: their names count in st_nlink), with the snapshots'
    checkpoints."""
    names: dict[int, int] = {}  # inode -> names found in these snapshots
    sizes: dict[int, os.stat_result] = {}
    total = 0
    for fd in dir_fds:
        for _, st in segments(fd):
            names[st.st_ino] = names.get(st.st_ino, 0) + 1
            sizes[st.st_ino] = st
        with contextlib.suppress(FileNotFoundError):
            total += os.stat(journal.CHECKPOINT_FILE, dir_fd=fd).st_blocks * 512
    return total + sum(st.st_blocks * 512 for ino, st in sizes.items() if st.st_nlink == names[ino])
