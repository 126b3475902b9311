"""The local volume model: the store's writing `Volume`, with each step run on the trio thread.

A step never awaits, so running it directly is atomic with respect to every other handler:
the trio thread runs nothing else until it returns.  That is what the handlers did before
the model seam existed, at nearly the same cost: `run` adds a closure and one coroutine call
per request, and the view's lookup by number and its change methods are the volume's own
bound methods, not wrappers.

Only the volume's public names are used (the ones `volfs.model.VolumeView` documents, plus
``inodes``, the map of inode numbers to inodes).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn, TypeVar, cast

from volfs.store.dirents import Listing
from volfs.store.readonly import ReadOnlyState
from volfs.store.volume import Inode, Volume

if TYPE_CHECKING:
    import trio

    from volfs.model import Node, VolumeView

T = TypeVar("T")


class LocalView:
    """`VolumeView` of a local `Volume`: lookups in its inode map, changes by its methods."""

    __slots__ = (
        "_inodes",
        "create",
        "exchange",
        "fallocate",
        "forget",
        "has_xattr",
        "hold",
        "inode",
        "link",
        "name",
        "new_inode",
        "read",
        "rename",
        "seek",
        "set_attrs",
        "set_xattr",
        "sync",
        "unlink",
        "volume",
        "write",
    )

    def __init__(self, volume: Volume) -> None:
        self.volume = volume
        self.name = volume.name
        self._inodes = volume.inodes
        # The volume's bound methods themselves: a step's change costs no extra call.
        self.new_inode = volume.new_inode
        self.create = volume.create
        self.link = volume.link
        self.unlink = volume.unlink
        self.rename = volume.rename
        self.exchange = volume.exchange
        self.set_attrs = volume.set_attrs
        self.set_xattr = volume.set_xattr
        self.write = volume.write
        self.fallocate = volume.fallocate
        self.read = volume.read
        self.seek = volume.seek
        self.has_xattr = volume.has_xattr
        self.forget = volume.forget
        self.hold = _same
        self.sync = volume.sync
        self.inode = volume.inodes.get  # the lookup by number, itself

    def child(self, directory: Node, name: bytes) -> Inode | None:
        # Only this view's own inodes come back to it, and the rules ask only of directories.
        ino = directory.entries.get(name)  # type: ignore[attr-defined]
        return None if ino is None else self._inodes[ino]

    def entry_count(self, directory: Node) -> int:
        return len(directory.entries)  # type: ignore[attr-defined]

    def listing(self, directory: Node) -> Listing:
        return Listing(directory.entries)  # type: ignore[attr-defined]

    @property
    def quota(self) -> int:
        return self.volume.quota

    @property
    def inode_limit(self) -> int:
        return self.volume.inode_limit

    @property
    def used_by_files(self) -> int:
        return self.volume.used_by_files

    @property
    def inodes_used(self) -> int:
        return self.volume.inodes_used

    def disk_stats(self) -> os.statvfs_result:
        return self.volume.disk_stats()


def _same(inode: Inode) -> Inode:
    """`hold`: one process serves the volume, so the lookup and open counts are enough."""
    return inode


def _read_only(*_args: object, **_kwargs: object) -> NoReturn:
    raise OSError(errno.EROFS, "a snapshot is read-only")


def _keep(_inode: Inode) -> None:
    """A snapshot's `forget`: it frees nothing (nothing in it is ever unlinked)."""


def _durable() -> None:
    """A snapshot's `sync`: it is durable already."""


class SnapshotView(LocalView):
    """`VolumeView` of a snapshot loaded read-only: its lookups, and changes that fail with
    EROFS (the rules refuse them first: the mount is read-only)."""

    def __init__(self, state: ReadOnlyState) -> None:  # not LocalView's: no Volume to bind
        self.volume = cast(Volume, state)  # only the figures below are read of it
        self.name = state.name
        self._inodes = state.inodes
        self.new_inode = self.create = self.link = self.unlink = _read_only
        self.rename = self.exchange = self.set_attrs = self.set_xattr = _read_only
        self.write = self.fallocate = _read_only
        self.read = state.read
        self.seek = state.seek
        self.has_xattr = state.has_xattr
        self.forget = _keep  # type: ignore[assignment]  # (mypy reads the slot as unbound)
        self.hold = _same
        self.sync = _durable
        self.inode = state.inodes.get

    @property
    def quota(self) -> int:
        return 0

    @property
    def inode_limit(self) -> int:
        return 0

    def disk_stats(self) -> os.statvfs_result:
        return os.statvfs(self.volume.dir_fd)


class LocalModel:
    """`VolumeModel` of a volume (or a snapshot) served by this process alone."""

    def __init__(self, volume: Volume | ReadOnlyState) -> None:
        self.volume = volume
        self.name = volume.name
        # Its change methods take the store's own `Inode`s, which are the only nodes it hands
        # out: so it is a `VolumeView`, though not by the letter of parameter variance.
        view = LocalView(volume) if isinstance(volume, Volume) else SnapshotView(volume)
        self.view = cast("VolumeView", view)

    async def run(self, step: Callable[[VolumeView], T]) -> T:
        """Run *step* at once: it does not await, so nothing else runs until it returns."""
        return step(self.view)

    async def lock_taken(self, ino: int) -> None:
        """Never called, as `unlock_event`."""
        raise AssertionError("the kernel keeps the locks of a local volume")

    def unlock_event(self, ino: int) -> trio.Event:
        """Never asked for: the kernel keeps a local volume's locks (the worker asks for
        lock requests only for a volume of an engine)."""
        raise AssertionError("the kernel keeps the locks of a local volume")
