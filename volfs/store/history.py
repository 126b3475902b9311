"""A volume's history in a store: snapshots of volumes not served, listing, removing, clones,
rollback, and loading a snapshot read-only.

The snapshot itself, on disk, is `volfs.store.snapshots`'s; a served volume is snapshotted by
its worker (`snapshots.take` between two requests).  Everything here works on volumes that
nobody serves, or only reads (a clone or a read-only load holds the snapshot's shared lock, so
the snapshot stays while they read it).

A clone is a new volume whose checkpoint is the snapshot's and whose segment files are hard
links to the snapshot's: its own segments start after them (the checkpoint covers the log up
to that number), so the clone never appends to a file it shares, and from then on it is a
volume like any other (its header's ``origin`` only says where it came from).  Rollback gives a
volume the snapshot's checkpoint, covering its log up to a segment number past every one it or
its snapshots have, and the snapshot's segment files it lacks: the later segments are dead at
once and go at its next checkpoint.  Snapshots taken after the one rolled back to stay as they
are (each is whole by itself): ZFS destroys them, volfs keeps them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from volfs.errors import ErrorCode, StoreError
from volfs.store import frame, headers, journal, pidlock, snapshots
from volfs.store.headers import check_name
from volfs.store.log import OPEN_FLAGS, Position, segment_name
from volfs.store.readonly import Pace, ReadOnlyState
from volfs.store.records import FORMAT
from volfs.store.root import StoreRoot
from volfs.store.space import segment_size_for

#: A clone being made: ``volumes/.cloning-NAME-XXXXXXXX``, its lock held while it is built.
CLONING_PREFIX = ".cloning-"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | OPEN_FLAGS


class _Opened:
    """A volume's directory and its ``snapshots/`` directory, open (`with` closes them)."""

    def __init__(self, store: StoreRoot, name: str, create: bool = False) -> None:
        self.name = name
        self.volume_fd = store.open_dir(name)
        try:
            self.snaps_fd = snapshots.open_dir(self.volume_fd, create)
        except BaseException:
            os.close(self.volume_fd)
            raise

    def snapshot(self, snap: str) -> int:
        if self.snaps_fd is None:
            raise StoreError(f"no such snapshot: {self.name}@{snap}", ErrorCode.NOT_FOUND)
        return snapshots.open_snapshot(self.snaps_fd, self.name, snap)

    def held(self, snap: str) -> tuple[int, int]:
        """The snapshot's directory and the fd of its shared lock (`snapshots.open_held`)."""
        if self.snaps_fd is None:
            raise StoreError(f"no such snapshot: {self.name}@{snap}", ErrorCode.NOT_FOUND)
        return snapshots.open_held(self.snaps_fd, self.name, snap)

    def names(self) -> list[str]:
        return [] if self.snaps_fd is None else snapshots.names(self.snaps_fd)

    def __enter__(self) -> _Opened:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.snaps_fd is not None:
            os.close(self.snaps_fd)
        os.close(self.volume_fd)


def check_exists(store: StoreRoot, label: str) -> None:
    """NOT_FOUND unless snapshot *label* (NAME@SNAP) exists."""
    name, snap = snapshots.parse_name(label)
    if not store.exists(name):
        raise StoreError(f"no such volume: {name}", ErrorCode.NOT_FOUND)
    with _Opened(store, name) as opened:
        os.close(opened.snapshot(snap))


def take_unserved(store: StoreRoot, name: str, snap: str) -> dict[str, Any]:
    """Snapshot volume *name*, which nobody serves (its lock is taken meanwhile): from its
    checkpoint if that covers its whole log (`snapshots.take_at_rest`), else loaded."""
    volume_fd = store.open_dir(name)
    try:
        lock_fd = store.lock(name, volume_fd)
        try:
            taken = snapshots.take_at_rest(volume_fd, headers.read_header(name, volume_fd), snap)
        finally:
            os.close(lock_fd)
    finally:
        os.close(volume_fd)
    if taken is not None:
        return taken
    volume = store.open_volume(name, create=False)
    try:
        return snapshots.take(volume, snap)
    finally:
        volume.close()


def describe(store: StoreRoot, name: str, only: str | None = None) -> list[dict[str, Any]]:
    """The snapshots of volume *name* as `ls --snapshots` and `inspect` show them, oldest first:
    name (NAME@SNAP), snapshot_of, created_ns, used, inodes, and held: the disk bytes only that
    snapshot keeps alive (what removing it gives back).  *only*: that snapshot alone."""
    rows: list[dict[str, Any]] = []
    with _Opened(store, name) as opened:
        if opened.snaps_fd is not None:  # what a killed removal left holds segments alive
            snapshots.sweep(opened.snaps_fd, taking=False)
        fds = {}
        try:
            for snap in opened.names() if only is None else [only]:
                fds[snap] = opened.snapshot(snap)
            held = snapshots.held_bytes(opened.volume_fd, fds)
            for snap, fd in fds.items():
                label = f"{name}@{snap}"
                try:
                    header = snapshots.read_header(fd, label)
                except StoreError as exc:
                    rows.append({"name": label, "snapshot_of": name, "problem": str(exc)})
                    continue
                rows.append(
                    {
                        "name": label,
                        "snapshot_of": name,
                        "created_ns": header.get("created_ns", 0),
                        "used": header.get("used", 0),
                        "inodes": header.get("inodes", 0),
                        "held": held[snap],
                    }
                )
        finally:
            for fd in fds.values():
                os.close(fd)
    rows.sort(key=lambda row: (row.get("created_ns", 0), row["name"]))
    return rows


def labels(store: StoreRoot) -> list[str]:
    """Every snapshot of the store (NAME@SNAP), by volume, oldest first; a volume whose
    snapshots cannot be listed (damaged) is left out, as `ls` shows it without them."""
    found = []
    for name in store.names():
        try:
            found += [row["name"] for row in describe(store, name)]
        except StoreError:
            continue
    return found


def snapshot_bytes(store: StoreRoot, name: str) -> int:
    """Bytes of volume *name* that only its snapshots keep alive (not it, not a clone)."""
    with _Opened(store, name) as opened:
        fds = {snap: opened.snapshot(snap) for snap in opened.names()}
        try:
            return snapshots.only_in_snapshots(opened.volume_fd, fds) if fds else 0
        finally:
            for fd in fds.values():
                os.close(fd)


def refuse_if_snapshotted(store: StoreRoot, name: str) -> None:
    """BUSY if volume *name* has snapshots (`remove_volume` checks again, under its lock)."""
    with _Opened(store, name) as opened:
        if opened.snaps_fd is not None:
            snapshots.check_removable(name, opened.volume_fd, recursive=False)


def names(store: StoreRoot, name: str) -> list[str]:
    """The names of volume *name*'s snapshots (SNAP, not NAME@SNAP), sorted."""
    with _Opened(store, name) as opened:
        return opened.names()


def count(store: StoreRoot, name: str) -> int:
    return len(names(store, name))


def remove(store: StoreRoot, name: str, snap: str) -> None:
    """Remove snapshot *name*@*snap*; BUSY while it is mounted, cloned or exported."""
    with _Opened(store, name) as opened:
        if opened.snaps_fd is None:
            raise StoreError(f"no such snapshot: {name}@{snap}", ErrorCode.NOT_FOUND)
        snapshots.remove(opened.snaps_fd, name, snap)


def remove_all(store: StoreRoot, name: str) -> None:
    """Remove every snapshot of volume *name* (`rm -r`); BUSY at the first one in use."""
    with _Opened(store, name) as opened:
        for snap in opened.names():
            assert opened.snaps_fd is not None
            snapshots.remove(opened.snaps_fd, name, snap)


def load(
    store: StoreRoot, name: str, snap: str, pace: Pace | None = None
) -> tuple[ReadOnlyState, int]:
    """Snapshot *name*@*snap* loaded read-only, and the fd holding its shared lock (closing
    it lets the snapshot be removed again): for a mount of it, an export, fsck and scrub.
    *pace* is called with the bytes about to be read (scrub's rate)."""
    label = f"{name}@{snap}"
    with _Opened(store, name) as opened:
        snap_fd, held = opened.held(snap)
        try:
            header = {**headers.read_header(name, opened.volume_fd), **_identity(snap_fd, label)}
            state = ReadOnlyState(label, snap_fd, header, pace)
        except BaseException:
            os.close(snap_fd)
            os.close(held)
            raise
    try:
        state.log.retry = False  # nobody replaces a snapshot's checkpoint
        state.load()
    except BaseException:
        state.close()
        os.close(held)
        raise
    return state, held


def _identity(snap_fd: int, label: str) -> dict[str, Any]:
    """What a read-only load needs of a snapshot's header: the volume id its segments name."""
    header = snapshots.read_header(snap_fd, label)
    return {"id": header.get("volume_id", ""), "snapshot": header}


def clone(
    store: StoreRoot, name: str, snap: str, new: str, size: int | None = None
) -> dict[str, Any]:
    """Make volume *new* from snapshot *name*@*snap*; return its header.

    The clone gets the origin's labels, inode limit and root settings, and its size unless
    *size* is given (not below what the snapshot holds)."""
    check_name(new)
    label = f"{name}@{snap}"
    if store.exists(new):
        raise StoreError(f"volume {new} exists: clone into a new name", ErrorCode.EXISTS)
    sweep_clones(store)
    with _Opened(store, name) as opened:
        snap_fd, held = opened.held(snap)
        try:
            origin = headers.read_header(name, opened.volume_fd)
            taken = snapshots.read_header(snap_fd, label)
            return _build_clone(store, origin, taken, snap_fd, new, size)
        finally:
            os.close(held)
            os.close(snap_fd)


def _build_clone(
    store: StoreRoot,
    origin: dict[str, Any],
    taken: dict[str, Any],
    snap_fd: int,
    new: str,
    size: int | None,
) -> dict[str, Any]:
    size = origin.get("size", 0) if size is None else size
    used = taken.get("used", 0)
    if size and size < used:
        raise StoreError(
            f"snapshot {origin['name']}@{taken['name']} holds {used} bytes: a clone of it "
            f"cannot be smaller ({size})",
            ErrorCode.INVALID,
        )
    header: dict[str, Any] = {
        **{key: origin[key] for key in ("labels", "inodes", "root") if key in origin},
        "kind": headers.VOLUME_KIND,
        "format": FORMAT,
        "name": new,
        "id": str(uuid.uuid4()),
        "created_ns": time.time_ns(),
        "segment_size": segment_size_for(size),
        "block_size": frame.BLOCK_SIZE,
        "size": size,
        "origin": {"volume": origin["name"], "snapshot": taken["name"],
                   "volume_id": origin["id"], "snapshot_id": taken.get("id", "")},
    }  # fmt: skip
    volumes = store.path / "volumes"
    staging = f"{CLONING_PREFIX}{new}-{uuid.uuid4().hex[:8]}"
    os.mkdir(volumes / staging, 0o700)
    volumes_fd = os.open(volumes, _DIR_FLAGS)
    staging_fd = lock_fd = -1
    try:
        staging_fd = os.open(staging, _DIR_FLAGS, dir_fd=volumes_fd)
        lock_fd = pidlock.take("lock", staging_fd)
        snapshots.link_segments(
            snap_fd, staging_fd, [seg for seg, _ in snapshots.segments(snap_fd)]
        )
        _copy_file(snap_fd, staging_fd, journal.CHECKPOINT_FILE)
        journal.write_durably(staging_fd, headers.HEADER_FILE, b"".join(frame.encode(header)))
        try:
            journal.rename_noreplace(volumes_fd, staging, new)
        except FileExistsError:
            raise StoreError(
                f"volume {new} was created meanwhile: clone into a new name", ErrorCode.EXISTS
            ) from None
        os.fsync(volumes_fd)
        staging = ""
    finally:
        for fd in (lock_fd, staging_fd):
            if fd >= 0:
                os.close(fd)
        if staging:
            shutil.rmtree(volumes / staging, ignore_errors=True)
        os.close(volumes_fd)
    return header


def _copy_file(src_fd: int, dst_fd: int, name: str) -> None:
    """Copy file *name* from directory *src_fd* to *dst_fd*, durably."""
    src = os.open(name, os.O_RDONLY | OPEN_FLAGS, dir_fd=src_fd)
    try:
        dst = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | OPEN_FLAGS, 0o600, dir_fd=dst_fd)
        try:
            left = os.fstat(src).st_size
            while left > 0:
                done = os.copy_file_range(src, dst, left)
                if done == 0:
                    raise OSError(f"{name} ended early while being copied")
                left -= done
            os.fsync(dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def sweep_clones(store: StoreRoot) -> None:
    """Remove what clones killed halfway left: ``.cloning-*`` directories nobody locks."""
    for entry in (store.path / "volumes").iterdir():
        if not entry.name.startswith(CLONING_PREFIX) or entry.is_symlink():
            continue
        with contextlib.suppress(OSError):
            if not pidlock.is_held(entry / "lock"):
                shutil.rmtree(entry, ignore_errors=True)


def rollback(store: StoreRoot, name: str, snap: str) -> dict[str, Any]:
    """Return volume *name*, which nobody serves, to snapshot *snap*; return the snapshot's
    header.  Crash-safe: the snapshot's segments are linked in first (dead to the volume
    until the new checkpoint names them), then the checkpoint replaces the volume's at once."""
    label = f"{name}@{snap}"
    with _Opened(store, name) as opened:
        try:
            lock_fd = pidlock.take("lock", opened.volume_fd)
        except pidlock.LockHeld:
            raise StoreError(
                f"volume {name} is mounted: unmount it to roll it back to {label}",
                ErrorCode.BUSY,
            ) from None
        try:
            snap_fd, held = opened.held(snap)
            try:
                taken = snapshots.read_header(snap_fd, label)
                _roll_back(opened, snap_fd, label)
            finally:
                os.close(held)
                os.close(snap_fd)
        finally:
            os.close(lock_fd)
    return taken


def _roll_back(opened: _Opened, snap_fd: int, label: str) -> None:
    volume_fd = opened.volume_fd
    numbers = [seg for seg, _ in snapshots.segments(volume_fd)]
    for other in opened.names():  # numbers the volume's snapshots hold, which it may lack now
        fd = snapshots.open_snapshot(opened.snaps_fd or -1, opened.name, other)
        try:
            numbers += [seg for seg, _ in snapshots.segments(fd)]
        finally:
            os.close(fd)
    start = max(numbers, default=0) + 1
    lacking = []
    for seg, st in snapshots.segments(snap_fd):
        try:
            have = os.stat(segment_name(seg), dir_fd=volume_fd, follow_symlinks=False)
        except FileNotFoundError:
            lacking.append(seg)
            continue
        if (have.st_dev, have.st_ino) != (st.st_dev, st.st_ino):
            raise StoreError(
                f"snapshot {label}: its segment {seg} is not the volume's file of that number; "
                "run fsck",
                ErrorCode.DAMAGED,
            )
    snapshots.link_segments(snap_fd, volume_fd, lacking)
    os.fsync(volume_fd)
    try:
        journal.copy_checkpoint(snap_fd, volume_fd, Position(start, 0))
    except journal.CheckpointDamage as exc:
        raise StoreError(f"snapshot {label}: its checkpoint is damaged ({exc}); run fsck",
                         ErrorCode.DAMAGED) from None  # fmt: skip
    taken = snapshots.read_header(snap_fd, label)
    headers.write_usage(volume_fd, {"used": taken.get("used", 0), "inodes": taken.get("inodes", 0)})


def snapshot_path(store: StoreRoot, name: str, snap: str) -> Path:
    return store.volume_path(name) / snapshots.SNAPSHOTS_DIR / snap
