"""The FUSE operations of a volume: pyfuse3's handlers on top of a volume model.

Each handler converts pyfuse3's arguments, runs one step of the POSIX rules (`volfs.posix`)
in the model (`volfs.model.VolumeModel.run`), which checks the request and makes the change
as one atomic unit, and converts the result for the kernel: attributes, file and directory
handles, lookup counts.  What goes wrong becomes an errno here, at the edge, in one place
(`_errno_guard`): a full volume or a failing store never takes the mount down.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import stat
from collections.abc import Callable, Coroutine, Sequence
from time import perf_counter
from typing import Any, TypeVar, cast

import pyfuse3
import trio
from pyfuse3 import (
    EntryAttributes,
    FileHandleT,
    FileInfo,
    FileNameT,
    FlagT,
    FUSEError,
    InodeT,
    LockRange,
    ModeT,
    ReaddirToken,
    RequestContext,
    SetattrFields,
    StatvfsData,
    XAttrNameT,
)

from volfs import posix, pyfuse3_build
from volfs.errors import DataDamaged, NoSpace
from volfs.model import Listing, Node, VolumeModel, VolumeView
from volfs.opstats import OpStats

log = logging.getLogger(__name__)

#: The attribute the kernel asks for before every write through the page cache: a write
#: must drop a file's capabilities.
CAPABILITY_XATTR = b"security.capability"
#: The kernel may cache entries and attributes this long.  One process serves each volume on a
#: host and every change goes through it, so the kernel's caches stay coherent.
CACHE_TIMEOUT = 60.0
#: Handlers whose first argument is a file handle rather than an inode number.
_BY_HANDLE = frozenset({"read", "write", "release", "fsync", "fallocate", "lseek", "getlk",
                        "setlk", "flock", "release_locks"})  # fmt: skip
#: The lock requests the kernel hands over to a model that keeps locks (`VolumeView.lock`).
LOCK_CAPABILITIES = ("POSIX_LOCKS", "FLOCK_LOCKS")
#: A lock request that waits tries again this often even if it heard of no release (one
#: whose notification was lost while the change feed reconnected).
LOCK_RECHECK = 1.0
#: A write with either flag (O_SYNC includes O_DSYNC) must be durable when it returns.
_SYNC_WRITE = os.O_DSYNC

Handler = TypeVar("Handler", bound=Callable[..., Coroutine[Any, Any, Any]])


def _errno_guard(handler: Handler) -> Handler:
    """Answer every failure with an errno: FUSEError as it is, a full volume or disk ENOSPC,
    damaged data EIO (the store logs which block), any other store failure EIO with a log
    line, and a bug EIO with its traceback, so a bad disk or a bug never takes the mount down
    and never shows the caller an errno that means something else (ENOENT for a missing
    segment file, say)."""
    name = handler.__name__

    # Positional arguments only, as pyfuse3 calls handlers: no keyword dict per request.
    async def guarded(self: VolumeOperations, *args: Any) -> Any:
        started = perf_counter()
        try:
            return await handler(self, *args)
        except FUSEError as exc:
            self.stats.failed(name, exc.errno)
            raise
        except NoSpace:  # the volume's size or inode limit: an answer, not a failure
            self.stats.failed(name, errno.ENOSPC)
            raise FUSEError(errno.ENOSPC) from None
        except DataDamaged:
            self.stats.failed(name, errno.EIO)
            self.stats.damage_found += 1
            raise FUSEError(errno.EIO) from None
        except OSError as exc:  # the store's disk or files: full, failing, or gone
            subject, fields = self._subject(name, args)
            log.error("volume %s: %s of %s failed in the store: %s", self.model.name, name,
                      subject, exc, extra=fields)  # fmt: skip
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            self.stats.failed(name, errno.ENOSPC if full else errno.EIO)
            raise FUSEError(errno.ENOSPC if full else errno.EIO) from None
        except Exception:
            subject, fields = self._subject(name, args)
            log.exception("volume %s: %s of %s failed", self.model.name, name, subject,
                          extra=fields)  # fmt: skip
            self.stats.failed(name, errno.EIO)
            raise FUSEError(errno.EIO) from None
        finally:
            self.stats.done(name, perf_counter() - started)

    functools.update_wrapper(guarded, handler)
    return cast(Handler, guarded)


class VolumeOperations(pyfuse3.Operations):
    """pyfuse3 handlers for one volume served by *model*."""

    enable_writeback_cache = False  # write() must not return before the store has the bytes
    # With the patched pyfuse3 (`volfs.pyfuse3_build`; the release ignores these three):
    # write() gets the request's flags, so a synchronous write is durable when it returns on
    # any path, direct I/O included, where the kernel sends no fsync after it.
    write_with_flags = True
    # Symlink targets never change, so the kernel may keep them in its page cache.
    enable_capabilities = pyfuse3_build.capability("CACHE_SYMLINKS")
    # Every change to a file's data goes through this mount's kernel (one serving process
    # per volume, other paths are binds of its mount; a punched hole the kernel drops from
    # its cache itself), so cached pages are never stale: a moved mtime must not drop them.
    disable_capabilities = pyfuse3_build.capability("AUTO_INVAL_DATA")

    def __init__(self, model: VolumeModel, read_only: bool = False, locks: bool = False) -> None:
        """*locks*: the model keeps POSIX and flock locks (a volume served from several
        hosts), so the kernel is asked to hand lock requests over; otherwise it keeps them
        itself, per mount, and the lock handlers are never called."""
        super().__init__()
        if locks:
            self.enable_capabilities = VolumeOperations.enable_capabilities
            for name in LOCK_CAPABILITIES:
                self.enable_capabilities |= pyfuse3_build.capability(name)
        self._locked: set[int] = set()  #: inodes this process took locks on (`release_locks`)
        self.model = model
        self.read_only = read_only
        self.rules = posix.PosixRules(read_only)
        self._files: dict[int, Node] = {}  #: open file handle -> its inode
        self._listings: dict[int, tuple[Node, Listing]] = {}  #: open directory handles
        self._next_fh = 1
        self._capability_absent = False  #: declared to pyfuse3 (`start`)
        self.stats = OpStats()  #: what the worker's control socket reports (`opstats`)

    # -- helpers --------------------------------------------------------------------------

    def _new_handle(self) -> int:
        """A handle number for an open file or directory, never given out before."""
        self._next_fh += 1
        return self._next_fh - 1

    async def start(self) -> None:
        """Once, before the first request.  Where no inode has file capabilities, pyfuse3 is
        told so (patch 0006) and answers the kernel's question for them itself: one round
        trip through the handlers fewer for every write() through the page cache.  The first
        setxattr of one withdraws that, for the life of this mount."""
        if "absent_xattrs" not in pyfuse3_build.features():
            return
        if not await self.model.run(lambda view: view.has_xattr(CAPABILITY_XATTR)):
            pyfuse3.set_absent_xattr(CAPABILITY_XATTR)
            self._capability_absent = True

    def _subject(self, handler: str, args: Sequence[object]) -> tuple[str, dict[str, Any]]:
        """What a failed handler worked on, for its log line and the record's fields: an
        inode (through a handle)."""
        if not args:
            return "the volume", {}
        ino = args[0]
        if handler in _BY_HANDLE:
            node = self._files.get(ino)  # type: ignore[call-overload]
            if node is None:
                return f"handle {ino}", {}
            ino = node.ino
        return f"inode {ino}", {"inode": ino}

    @staticmethod
    def _attrs(inode: Node) -> EntryAttributes:
        entry = EntryAttributes()
        entry.st_ino = inode.ino  # generation: 0, as pyfuse3 starts it
        entry.entry_timeout = CACHE_TIMEOUT
        entry.attr_timeout = CACHE_TIMEOUT
        entry.st_mode = inode.mode
        entry.st_nlink = inode.nlink
        entry.st_uid = inode.uid
        entry.st_gid = inode.gid
        entry.st_rdev = inode.rdev
        entry.st_size = inode.size
        entry.st_blksize = 4096
        entry.st_blocks = (inode.stored + 511) // 512
        entry.st_atime_ns = inode.atime_ns
        entry.st_mtime_ns = inode.mtime_ns
        entry.st_ctime_ns = inode.ctime_ns
        return entry

    def _entry(self, inode: Node) -> EntryAttributes:
        """Attributes for a reply that gives the kernel a reference (raises the lookup count)."""
        inode.lookups += 1
        return self._attrs(inode)

    # -- lookups and attributes -----------------------------------------------------------

    @_errno_guard
    async def lookup(
        self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        node = await self.model.run(lambda view: self.rules.lookup(view, parent_inode, name))
        if node is None:
            # A negative entry the kernel may cache (st_ino 0): every create goes through this
            # one mount, so the kernel drops it when the name appears.
            missing = EntryAttributes()
            missing.st_ino = 0
            missing.entry_timeout = CACHE_TIMEOUT
            return missing
        return self._entry(node)

    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        def step(view: VolumeView) -> None:
            for ino, nlookup in inode_list:
                inode = view.inode(ino)
                if inode is not None:
                    inode.lookups -= nlookup
                    view.forget(inode)

        await self.model.run(step)

    @_errno_guard
    async def getattr(self, inode: InodeT, ctx: RequestContext) -> EntryAttributes:
        return self._attrs(await self.model.run(lambda view: posix.existing(view, inode)))

    @_errno_guard
    async def setattr(
        self,
        inode: InodeT,
        attr: EntryAttributes,
        fields: SetattrFields,
        fh: FileHandleT | None,
        ctx: RequestContext,
    ) -> EntryAttributes:
        def step(view: VolumeView) -> Node:
            return self.rules.setattr(
                view,
                inode,
                mode=attr.st_mode if fields.update_mode else None,
                uid=attr.st_uid if fields.update_uid else None,
                gid=attr.st_gid if fields.update_gid else None,
                size=attr.st_size if fields.update_size else None,
                atime_ns=attr.st_atime_ns if fields.update_atime else None,
                mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
                ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
            )

        return self._attrs(await self.model.run(step))

    @_errno_guard
    async def readlink(self, inode: InodeT, ctx: RequestContext) -> FileNameT:
        return await self.model.run(lambda view: self.rules.readlink(view, inode))

    # -- creating and removing names ------------------------------------------------------

    @_errno_guard
    async def mknod(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, rdev: int, ctx: RequestContext
    ) -> EntryAttributes:
        uid, gid, umask = ctx.uid, ctx.gid, ctx.umask
        node = await self.model.run(
            lambda view: self.rules.mknod(view, parent_inode, name, mode, rdev, uid, gid, umask)
        )
        return self._entry(node)

    @_errno_guard
    async def mkdir(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, ctx: RequestContext
    ) -> EntryAttributes:
        uid, gid, umask = ctx.uid, ctx.gid, ctx.umask
        node = await self.model.run(
            lambda view: self.rules.mkdir(view, parent_inode, name, mode, uid, gid, umask)
        )
        return self._entry(node)

    @_errno_guard
    async def symlink(
        self, parent_inode: InodeT, name: FileNameT, target: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        uid, gid = ctx.uid, ctx.gid
        node = await self.model.run(
            lambda view: self.rules.symlink(view, parent_inode, name, target, uid, gid)
        )
        return self._entry(node)

    @_errno_guard
    async def link(
        self, inode: InodeT, new_parent_inode: InodeT, new_name: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        node = await self.model.run(
            lambda view: self.rules.link(view, inode, new_parent_inode, new_name)
        )
        return self._entry(node)

    @_errno_guard
    async def unlink(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        await self.model.run(lambda view: self.rules.unlink(view, parent_inode, name))

    @_errno_guard
    async def rmdir(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        await self.model.run(lambda view: self.rules.rmdir(view, parent_inode, name))

    @_errno_guard
    async def rename(
        self,
        parent_inode_old: InodeT,
        name_old: FileNameT,
        parent_inode_new: InodeT,
        name_new: FileNameT,
        flags: FlagT,
        ctx: RequestContext,
    ) -> None:
        await self.model.run(
            lambda view: self.rules.rename(
                view, parent_inode_old, name_old, parent_inode_new, name_new, flags
            )
        )

    # -- files ----------------------------------------------------------------------------

    def _open(self, inode: Node) -> FileInfo:
        """A new handle on *inode*, which a step has found and checked."""
        fh = self._new_handle()
        self._files[fh] = inode
        inode.opens += 1
        # Not direct_io (yet), even for write-only handles, though it would spare the
        # getxattr(security.capability) the kernel sends before each write through the page
        # cache: a direct write of an O_SYNC/O_DSYNC descriptor or with RWF_SYNC/RWF_DSYNC
        # gets no fsync from the kernel.  With the patched pyfuse3 `write` sees the flag and
        # syncs itself, so direct_io would keep that promise there; on the plain release it
        # would not, and its cost on reads and the page cache is still to be measured.
        return FileInfo(fh=fh, keep_cache=True)

    @_errno_guard
    async def open(self, inode: InodeT, flags: FlagT, ctx: RequestContext) -> FileInfo:
        node = await self.model.run(lambda view: view.hold(self.rules.open(view, inode, flags)))
        info = self._open(node)
        if not node.nlink:  # a deleted file opened again (/proc/PID/fd) counts again
            await self.model.run(lambda view: view.forget(node))
        return info

    @_errno_guard
    async def create(
        self,
        parent_inode: InodeT,
        name: FileNameT,
        mode: ModeT,
        flags: FlagT,
        ctx: RequestContext,
    ) -> tuple[FileInfo, EntryAttributes]:
        uid, gid = ctx.uid, ctx.gid
        mode = stat.S_IFREG | (stat.S_IMODE(mode) & ~ctx.umask)
        node = await self.model.run(
            lambda view: view.hold(
                self.rules.create(view, parent_inode, name, mode, uid, gid, flags)
            )
        )
        entry = self._entry(node)
        return self._open(node), entry

    @_errno_guard
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        node = self._files[fh]
        data = await self.model.run(lambda view: view.read(node, off, size))
        self.stats.bytes_read += len(data)
        return data

    @_errno_guard
    async def write(self, fh: FileHandleT, off: int, buf: bytes, flags: FlagT = 0) -> int:
        node = self._files[fh]
        written = await self.model.run(lambda view: self.rules.write(view, node, off, buf))
        self.stats.bytes_written += written
        if flags & _SYNC_WRITE:  # as fsync does (through the page cache, the fsync that
            await self.model.run(_sync)  # follows then finds nothing left to sync)
            self.stats.sync_writes += 1
        return written

    @_errno_guard
    async def fallocate(self, fh: FileHandleT, mode: FlagT, offset: int, length: int) -> None:
        node = self._files[fh]
        await self.model.run(lambda view: self.rules.fallocate(view, node, mode, offset, length))

    @_errno_guard
    async def lseek(self, fh: FileHandleT, offset: int, whence: int) -> int:
        node = self._files[fh]
        return await self.model.run(lambda view: self.rules.seek(view, node, offset, whence))

    async def flush(self, fh: FileHandleT) -> None:
        # write() already put every byte in the store, so close() has nothing to flush.
        # ENOSYS tells the kernel to stop sending FLUSH at all: one round trip less per close.
        raise FUSEError(errno.ENOSYS)

    @_errno_guard
    async def release(self, fh: FileHandleT) -> None:
        inode = self._files.pop(fh)
        inode.opens -= 1
        await self.model.run(lambda view: view.forget(inode))

    @_errno_guard
    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        await self.model.run(_sync)

    # -- locks (only for a model that keeps them: see `__init__`) -------------------------

    @_errno_guard
    async def getlk(self, fh: FileHandleT, owner: int, lock: LockRange) -> LockRange:
        node = self._files[fh]
        return await self.model.run(lambda view: view.test_lock(node, owner, lock))

    @_errno_guard
    async def setlk(self, fh: FileHandleT, owner: int, lock: LockRange, sleep: bool) -> None:
        await self._lock(fh, owner, False, lock, sleep, errno.EAGAIN)

    @_errno_guard
    async def flock(self, fh: FileHandleT, owner: int, op: int) -> None:
        kind = (fcntl.F_UNLCK if op & fcntl.LOCK_UN else
                fcntl.F_WRLCK if op & fcntl.LOCK_EX else fcntl.F_RDLCK)  # fmt: skip
        sleep = not op & (fcntl.LOCK_NB | fcntl.LOCK_UN)
        await self._lock(fh, owner, True, LockRange(kind, 0, 0, 0), sleep, errno.EWOULDBLOCK)

    async def _lock(self, fh: FileHandleT, owner: int, flock: bool, lock: LockRange,
                    sleep: bool, refusal: int) -> None:  # fmt: skip
        """Take (or release) *lock*, refused with errno *refusal* while another owner's lock
        conflicts, or (*sleep*) waiting without a connection until a release on the inode
        is heard of, or `LOCK_RECHECK` has passed.  pyfuse3 runs a request that may wait
        in a task of its own and cancels it if the kernel interrupts it (EINTR)."""
        node = self._files[fh]
        waiting = False
        while True:
            # Taken before trying: a release committed after the try's snapshot sets it.
            released = self.model.unlock_event(node.ino) if sleep else None
            if await self.model.run(lambda view: view.lock(node, owner, flock, lock)):
                if lock.type != fcntl.F_UNLCK:
                    self._locked.add(node.ino)
                    with trio.CancelScope(shield=True):  # granted: an interrupt now is late
                        await self.model.lock_taken(node.ino)
                return
            if released is None:
                raise FUSEError(refusal)
            if not waiting:
                waiting = True
                self.stats.lock_waits += 1
            with trio.move_on_after(LOCK_RECHECK) as waited:
                await released.wait()
            if waited.cancelled_caught:
                self.stats.lock_rechecks += 1
            else:
                self.stats.lock_wakeups += 1

    @_errno_guard
    async def release_locks(self, fh: FileHandleT, owner: int) -> None:
        # Called at every close: only a file this process has locked costs a step.
        node = self._files[fh]
        if node.ino in self._locked and not await self.model.run(
            lambda view: view.unlock_owner(node, owner)
        ):
            self._locked.discard(node.ino)

    # -- directories ----------------------------------------------------------------------

    @_errno_guard
    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileHandleT:
        def step(view: VolumeView) -> tuple[Node, Listing]:
            found = posix.directory(view, inode)
            return found, view.listing(found)

        listing = await self.model.run(step)
        fh = self._new_handle()
        self._listings[fh] = listing
        return fh

    @_errno_guard
    async def readdir(self, fh: FileHandleT, start_id: int, token: ReaddirToken) -> None:
        directory, listing = self._listings[fh]
        if directory.nlink == 0:
            return  # removed while open: nothing more to list

        # The one step that acts outside the view: it fills the kernel's reply as it goes
        # (the buffer decides how many entries fit) and counts the references replies give.
        # It only reads the volume, so a model runs it once (a database model: in a
        # read-only snapshot, which cannot fail to serialize).
        def step(view: VolumeView) -> None:
            # "." and ".." first, at offsets 1 and 2 (entries start at 3).  The kernel takes
            # no reference for them, so their lookup counts stay as they are.
            parent = view.inode(directory.parent or directory.ino) or directory
            for offset, name, node in ((1, b".", directory), (2, b"..", parent)):
                if start_id < offset and not pyfuse3.readdir_reply(
                    token, name, self._attrs(node), offset
                ):
                    return
            for name, ino, offset in listing.after(start_id):
                child = posix.existing(view, ino)
                if not pyfuse3.readdir_reply(token, name, self._attrs(child), offset):
                    break
                child.lookups += 1

        await self.model.run(step)

    async def releasedir(self, fh: FileHandleT) -> None:
        del self._listings[fh]

    @_errno_guard
    async def fsyncdir(self, fh: FileHandleT, datasync: bool) -> None:
        await self.model.run(lambda view: view.sync())

    @_errno_guard
    async def statfs(self, ctx: RequestContext) -> StatvfsData:
        return await self.model.run(_statfs)

    # -- extended attributes --------------------------------------------------------------

    @_errno_guard
    async def setxattr(
        self, inode: InodeT, name: XAttrNameT, value: bytes, ctx: RequestContext
    ) -> None:
        uid = ctx.uid
        if name == CAPABILITY_XATTR and self._capability_absent:
            pyfuse3.set_absent_xattr(name, False)  # before any inode can have one
            self._capability_absent = False
        await self.model.run(lambda view: self.rules.setxattr(view, inode, name, value, uid))

    @_errno_guard
    async def getxattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> bytes:
        uid = ctx.uid
        value = await self.model.run(lambda view: self.rules.getxattr(view, inode, name, uid))
        if value is None:
            raise FUSEError(pyfuse3.ENOATTR)
        return value

    @_errno_guard
    async def listxattr(self, inode: InodeT, ctx: RequestContext) -> Sequence[XAttrNameT]:
        uid = ctx.uid
        return await self.model.run(lambda view: self.rules.listxattr(view, inode, uid))

    @_errno_guard
    async def removexattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> None:
        uid = ctx.uid
        await self.model.run(lambda view: self.rules.removexattr(view, inode, name, uid))


def _sync(view: VolumeView) -> None:
    view.sync()


def _statfs(view: VolumeView) -> StatvfsData:
    """The figures of the disk that holds the volume, or of its size and inode limit."""
    disk = view.disk_stats()
    stats = StatvfsData()
    stats.f_bsize = stats.f_frsize = disk.f_frsize
    blocks, free = disk.f_blocks, disk.f_bavail
    if view.quota:  # a sized volume shows its own size, used and free space
        blocks = view.quota // disk.f_frsize
        used = -(-view.used_by_files // disk.f_frsize)
        free = max(0, min(free, blocks - used))
    stats.f_blocks = blocks
    stats.f_bfree = stats.f_bavail = free
    if view.inode_limit:
        stats.f_files = view.inode_limit
        stats.f_ffree = stats.f_favail = max(0, view.inode_limit - view.inodes_used)
    else:
        stats.f_files = view.inodes_used + disk.f_ffree
        stats.f_ffree = stats.f_favail = disk.f_ffree
    stats.f_namemax = posix.NAME_MAX
    return stats
