"""The seam between the FUSE operations and a volume model: what the POSIX rules may ask of a
volume, and how a model runs them atomically.

A *step* is a plain synchronous function of a `VolumeView`: it looks up inodes and names,
decides by the POSIX rules (`volfs.posix`), and makes the change, all through the view.  A
`VolumeModel` runs one step as one atomic unit: no other step sees it half done.  A model may
run a step more than once (a database model retries it after a serialization failure), so a
step has no effect outside the view and raises its answer (`pyfuse3.FUSEError`) rather than
keeping it somewhere.

The local model (`volfs.localmodel`) runs a step directly on the trio thread: a step never
awaits, so no other handler runs in between, exactly as when the handlers made the calls
themselves.  A database model would run it in a thread inside one transaction.

The view's change methods are the writing store volume's (`volfs.store.volume.Volume`) public
methods, with the same names and signatures: each journals one operation before applying it,
and fails (`NoSpace`, an `OSError` of the disk) before changing anything.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    import trio
    from pyfuse3 import LockRange

T = TypeVar("T")


class Node(Protocol):
    """One inode as the rules and the FUSE layer see it.

    The attributes are the stored ones; change them through the view, never directly (but
    for a new inode's symlink target before `VolumeView.create`).  ``lookups`` and ``opens``
    are the serving process's own references (the kernel's lookup counts and open handles),
    not volume state: the FUSE layer counts them, and the view's `forget` acts on them.
    """

    ino: int
    mode: int
    uid: int
    gid: int
    rdev: int
    size: int
    stored: int  #: bytes of data held (holes excluded)
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    nlink: int
    target: bytes | None  #: a symlink's target
    xattrs: dict[bytes, bytes] | None
    parent: int  #: a directory's parent directory (the root: itself, or 0)
    lookups: int
    opens: int


class Listing(Protocol):
    """One open directory handle's pass over a directory (`volfs.store.dirents.Listing`)."""

    def after(self, offset: int) -> Iterator[tuple[bytes, int, int]]:
        """(name, inode number, offset) of each entry after *offset*; 0 starts afresh."""
        ...


class VolumeView(Protocol):
    """The metadata and data of one volume as seen inside one atomic step."""

    name: str  #: the volume's name, for log lines

    # -- lookups ------------------------------------------------------------------------------

    def inode(self, ino: int) -> Node | None:
        """The inode numbered *ino*, or None if there is none."""
        ...

    def child(self, directory: Node, name: bytes) -> Node | None:
        """The inode *name* in *directory* names, or None."""
        ...

    def entry_count(self, directory: Node) -> int:
        """How many names *directory* holds ("." and ".." not counted)."""
        ...

    def listing(self, directory: Node) -> Listing:
        """A new pass over *directory*'s names for one open directory handle."""
        ...

    # -- changes, each journaled as one operation -------------------------------------------

    def new_inode(self, mode: int, uid: int, gid: int, rdev: int, now_ns: int) -> Node:
        """An inode that exists only in the step until `create` adds it."""
        ...

    def create(self, parent: Node, name: bytes, inode: Node, now_ns: int) -> None: ...

    def link(self, inode: Node, parent: Node, name: bytes, now_ns: int) -> None: ...

    def unlink(self, parent: Node, name: bytes, child: Node, now_ns: int) -> None: ...

    def rename(
        self,
        old_parent: Node,
        old_name: bytes,
        new_parent: Node,
        new_name: bytes,
        replaced: Node | None,
        now_ns: int,
    ) -> None:
        """Move an entry, replacing *replaced* (the inode at the new name) if given."""
        ...

    def exchange(
        self, parent_a: Node, name_a: bytes, parent_b: Node, name_b: bytes, now_ns: int
    ) -> None: ...

    def set_attrs(
        self,
        inode: Node,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        ctime_ns: int,
    ) -> None: ...

    def set_xattr(self, inode: Node, name: bytes, value: bytes | None, now_ns: int) -> None:
        """Set an extended attribute, or remove it (*value* None)."""
        ...

    # -- data ---------------------------------------------------------------------------------

    def write(self, inode: Node, offset: int, data: bytes, now_ns: int) -> None:
        """Write *data* at *offset*; `NoSpace` past the volume's size."""
        ...

    def fallocate(
        self,
        inode: Node,
        offset: int,
        length: int,
        now_ns: int,
        *,
        keep_size: bool = False,
        punch: bool = False,
    ) -> None:
        """Allocate [offset, offset+length) of a regular file (zeros in its holes; the file
        grows to its end unless *keep_size*), or with *punch* make it read as zeros, holes
        where it can, size kept; `NoSpace` if an allocation does not fit the volume's size."""
        ...

    def has_xattr(self, name: bytes) -> bool:
        """Whether any inode has the extended attribute *name* (once per mount: may scan);
        on a volume other hosts change too always True: any of them may set it later."""
        ...

    def read(self, inode: Node, offset: int, size: int) -> bytes:
        """Verified bytes of a regular file; `DataDamaged` rather than wrong bytes."""
        ...

    def seek(self, inode: Node, offset: int, hole: bool) -> int | None:
        """The first offset at or after *offset* of a regular file that holds data (with
        *hole*: that is in a hole, the end of the file counting as one); None if there is
        none or *offset* is at or past the end (lseek's SEEK_DATA and SEEK_HOLE)."""
        ...

    def forget(self, inode: Node) -> None:
        """Drop an unlinked inode once no lookups or opens reach it any more."""
        ...

    def hold(self, inode: Node) -> Node:
        """*inode*, which this process is about to open: a model shared by several hosts
        records that it is open here, so that no other host frees it while it is (`forget`
        lets go); the local model has nothing to record."""
        ...

    def sync(self) -> None:
        """Make every change committed so far durable."""
        ...

    # -- locks, of a model shared by several hosts ----------------------------------------------
    #
    # The local model keeps none: it does not ask the kernel for lock requests, which it then
    # keeps itself, per mount, at no cost to this process.  A model served from several hosts
    # keeps POSIX record locks and flock locks in the volume, each owned by this process's
    # session and the *owner* the kernel names.

    def lock(self, inode: Node, owner: int, flock: bool, lock: LockRange) -> bool:
        """Take, change or release (``F_UNLCK``) *owner*'s lock on *inode*: a POSIX record
        lock over *lock*'s range, or (*flock*) a flock lock of the whole file (``F_RDLCK``
        shared, ``F_WRLCK`` exclusive); False if a lock of another owner conflicts (POSIX:
        nothing changed; flock: a lock of *owner* being converted is dropped, as on Linux)."""
        ...

    def test_lock(self, inode: Node, owner: int, lock: LockRange) -> LockRange:
        """F_GETLK: a POSIX lock of another owner that conflicts with *lock* (its type,
        range and process), or *lock* with type ``F_UNLCK``."""
        ...

    def unlock_owner(self, inode: Node, owner: int) -> bool:
        """Drop every lock of *owner* on *inode* (its descriptor closed); whether this process
        still holds any lock there."""
        ...

    # -- limits and figures ---------------------------------------------------------------------

    quota: int  #: most bytes the volume may hold; 0: no limit
    inode_limit: int  #: most inodes; 0: no limit

    @property
    def used_by_files(self) -> int: ...

    @property
    def inodes_used(self) -> int: ...

    def disk_stats(self) -> os.statvfs_result:
        """Capacity figures of what holds the volume."""
        ...


class VolumeModel(Protocol):
    """Runs steps on one volume, each atomically."""

    name: str

    async def run(self, step: Callable[[VolumeView], T]) -> T:
        """Run *step* on a view of the volume as one atomic unit; return what it returns.

        The step may be run more than once; what it raises (a `pyfuse3.FUSEError` answer, a
        store failure) ends it with nothing changed by that run.
        """
        ...

    async def lock_taken(self, ino: int) -> None:
        """A lock on inode *ino* was just granted: before the caller learns so, make what
        other hosts committed before it visible here (what the kernel cached of them
        dropped), since the last holder's writes may be what the caller locked for."""
        ...

    def unlock_event(self, ino: int) -> trio.Event:
        """An event set once a lock on inode *ino* may have been released, by any host,
        after this call: a lock request that must wait takes it before it tries, and tries
        again when it is set (only for a model that keeps locks: see `VolumeView.lock`)."""
        ...
