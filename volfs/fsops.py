"""The FUSE operations of a volume: POSIX rules and errnos on top of the store's `Volume`.

Every handler is synchronous at heart: it checks the request against POSIX, picks the errno if
it fails, and makes at most one `Volume` call, which journals the change before applying it.
Nothing awaits between the check and the change, so handlers never interleave and need no locks.
Store failures (a full or failing disk, damaged data) become errnos, never a dead mount.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time

import pyfuse3

from volfs.errors import DataDamaged, NoSpace
from volfs.store.dirents import Listing
from volfs.store.volume import ROOT_INO, Inode, Volume

log = logging.getLogger(__name__)

NAME_MAX = 255
PATH_MAX = 4096
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.", b"system.")
#: The kernel may cache entries and attributes this long.  One process serves each volume on a
#: host and every change goes through it, so the kernel's caches stay coherent.
CACHE_TIMEOUT = 60.0
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
#: File capabilities: the kernel asks for them before every write through the page cache.
CAPS_XATTR = b"security.capability"
_SETGID_TYPES = (stat.S_IFDIR,)


def _errno_guard(handler):
    """Turn store failures into errnos so a bad disk or a bug never takes the mount down."""

    @functools.wraps(handler)
    async def guarded(self, *args):
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except NoSpace:  # the volume's size or inode limit: an answer, not a failure
            raise pyfuse3.FUSEError(errno.ENOSPC) from None
        except DataDamaged:
            raise pyfuse3.FUSEError(errno.EIO) from None
        except OSError as exc:
            log.error(
                "volume %s: %s failed in the store: %s", self.volume.name, handler.__name__, exc
            )
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("volume %s: %s failed", self.volume.name, handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return guarded


def _fail(code: int):
    return pyfuse3.FUSEError(code)


class VolumeOperations(pyfuse3.Operations):
    """pyfuse3 handlers for one volume."""

    enable_writeback_cache = False  # write() must not return before the store has the bytes

    def __init__(self, volume: Volume, read_only: bool = False) -> None:
        super().__init__()
        self.volume = volume
        self.read_only = read_only
        self._inodes = volume.inodes
        self._files: dict[int, Inode] = {}  #: open file handle -> its inode
        self._listings: dict[int, tuple[Inode, Listing]] = {}  #: open directory handles
        self._next_fh = 1

    # -- helpers --------------------------------------------------------------------------

    def _inode(self, ino: int) -> Inode:
        inode = self._inodes.get(ino)
        if inode is None:
            raise _fail(errno.ENOENT)
        return inode

    def _dir(self, ino: int) -> Inode:
        inode = self._inode(ino)
        if inode.entries is None:
            raise _fail(errno.ENOTDIR)
        return inode

    def _new_handle(self) -> int:
        """A handle number for an open file or directory, never given out before."""
        self._next_fh += 1
        return self._next_fh - 1

    def _writable(self) -> None:
        if self.read_only:
            raise _fail(errno.EROFS)

    @staticmethod
    def _check_name(name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise _fail(errno.ENAMETOOLONG)

    def _child(self, parent: Inode, name: bytes) -> Inode:
        ino = parent.entries.get(name)
        if ino is None:
            self._check_name(name)
            raise _fail(errno.ENOENT)
        return self._inodes[ino]

    def _attrs(self, inode: Inode) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode.ino
        entry.generation = 0
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

    def _entry(self, inode: Inode) -> pyfuse3.EntryAttributes:
        """Attributes for a reply that gives the kernel a reference (raises the lookup count)."""
        inode.lookups += 1
        return self._attrs(inode)

    def _new(self, parent: Inode, name: bytes, mode: int, ctx, rdev: int = 0, target=None):
        """Create *name* in *parent* owned by the caller, as POSIX and setgid dirs say."""
        self._writable()
        self._check_name(name)
        if name in parent.entries:
            raise _fail(errno.EEXIST)
        gid = ctx.gid
        if parent.mode & stat.S_ISGID:
            gid = parent.gid
            if stat.S_IFMT(mode) in _SETGID_TYPES:
                mode |= stat.S_ISGID
        now = time.time_ns()
        inode = self.volume.new_inode(mode, ctx.uid, gid, rdev, now)
        if target is not None:
            inode.target = target
            inode.size = len(target)
        self.volume.create(parent, name, inode, now)
        return self._entry(self._inodes[inode.ino])

    # -- lookups and attributes -----------------------------------------------------------

    @_errno_guard
    async def lookup(self, parent_inode, name, ctx=None):
        parent = self._dir(parent_inode)
        ino = parent.entries.get(name)
        if ino is None:
            self._check_name(name)
            # A negative entry the kernel may cache (st_ino 0): every create goes through this
            # one mount, so the kernel drops it when the name appears.
            missing = pyfuse3.EntryAttributes()
            missing.st_ino = 0
            missing.entry_timeout = CACHE_TIMEOUT
            return missing
        return self._entry(self._inodes[ino])

    async def forget(self, inode_list):
        for ino, nlookup in inode_list:
            inode = self._inodes.get(ino)
            if inode is not None:
                inode.lookups -= nlookup
                self.volume.forget(inode)

    @_errno_guard
    async def getattr(self, inode, ctx=None):
        return self._attrs(self._inode(inode))

    @_errno_guard
    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self._inode(inode)
        self._writable()
        now = time.time_ns()
        size = None
        if fields.update_size:
            if node.extents is None:
                raise _fail(errno.EISDIR if node.entries is not None else errno.EINVAL)
            size = attr.st_size
        mtime = attr.st_mtime_ns if fields.update_mtime else None
        if mtime is None and size is not None:
            mtime = now  # a truncation is a modification
        self.volume.set_attrs(
            node,
            mode=(node.mode & ~0o7777) | (attr.st_mode & 0o7777) if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=size,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=mtime,
            ctime_ns=attr.st_ctime_ns if fields.update_ctime else now,
        )
        return self._attrs(node)

    @_errno_guard
    async def readlink(self, inode, ctx):
        node = self._inode(inode)
        if node.target is None:
            raise _fail(errno.EINVAL)
        return node.target

    # -- creating and removing names ------------------------------------------------------

    @_errno_guard
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        if not (
            stat.S_ISREG(mode)
            or stat.S_ISFIFO(mode)
            or stat.S_ISSOCK(mode)
            or stat.S_ISCHR(mode)
            or stat.S_ISBLK(mode)
        ):
            raise _fail(errno.EINVAL)
        mode = stat.S_IFMT(mode) | (stat.S_IMODE(mode) & ~ctx.umask)
        return self._new(self._dir(parent_inode), name, mode, ctx, rdev=rdev)

    @_errno_guard
    async def mkdir(self, parent_inode, name, mode, ctx):
        mode = stat.S_IFDIR | (stat.S_IMODE(mode) & ~ctx.umask)
        return self._new(self._dir(parent_inode), name, mode, ctx)

    @_errno_guard
    async def symlink(self, parent_inode, name, target, ctx):
        if len(target) >= PATH_MAX:
            raise _fail(errno.ENAMETOOLONG)
        return self._new(self._dir(parent_inode), name, stat.S_IFLNK | 0o777, ctx, target=target)

    @_errno_guard
    async def link(self, inode, new_parent_inode, new_name, ctx):
        self._writable()
        node = self._inode(inode)
        parent = self._dir(new_parent_inode)
        self._check_name(new_name)
        if node.entries is not None:
            raise _fail(errno.EPERM)
        if new_name in parent.entries:
            raise _fail(errno.EEXIST)
        if node.nlink == 0:
            raise _fail(errno.ENOENT)
        self.volume.link(node, parent, new_name, time.time_ns())
        return self._entry(node)

    @_errno_guard
    async def unlink(self, parent_inode, name, ctx):
        self._writable()
        parent = self._dir(parent_inode)
        child = self._child(parent, name)
        if child.entries is not None:
            raise _fail(errno.EISDIR)
        self.volume.unlink(parent, name, child, time.time_ns())

    @_errno_guard
    async def rmdir(self, parent_inode, name, ctx):
        self._writable()
        parent = self._dir(parent_inode)
        child = self._child(parent, name)
        if child.entries is None:
            raise _fail(errno.ENOTDIR)
        if len(child.entries):
            raise _fail(errno.ENOTEMPTY)
        self.volume.unlink(parent, name, child, time.time_ns())

    def _is_ancestor(self, ancestor: Inode, inode: Inode) -> bool:
        """Whether *ancestor* is *inode* or one of the directories above it."""
        ino = inode.ino
        while True:
            if ino == ancestor.ino:
                return True
            if ino == ROOT_INO:
                return False
            ino = self._inodes[ino].parent

    @_errno_guard
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self._writable()
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (
            RENAME_NOREPLACE | RENAME_EXCHANGE
        ):
            raise _fail(errno.EINVAL)
        old_parent = self._dir(parent_inode_old)
        new_parent = self._dir(parent_inode_new)
        self._check_name(name_new)
        moved = self._child(old_parent, name_old)
        target_ino = new_parent.entries.get(name_new)
        target = None if target_ino is None else self._inodes[target_ino]
        now = time.time_ns()
        if flags & RENAME_EXCHANGE:
            if target is None:
                raise _fail(errno.ENOENT)
            for node, other_parent in ((moved, new_parent), (target, old_parent)):
                if node.entries is not None and self._is_ancestor(node, other_parent):
                    raise _fail(errno.EINVAL)
            if moved is not target:
                self.volume.exchange(old_parent, name_old, new_parent, name_new, now)
            return
        if moved.entries is not None and self._is_ancestor(moved, new_parent):
            raise _fail(errno.EINVAL)
        if target is not None:
            if flags & RENAME_NOREPLACE:
                raise _fail(errno.EEXIST)
            if target is moved:
                return  # two links to one inode: POSIX says do nothing
            if moved.entries is not None:
                if target.entries is None:
                    raise _fail(errno.ENOTDIR)
                if len(target.entries):
                    raise _fail(errno.ENOTEMPTY)
            elif target.entries is not None:
                raise _fail(errno.EISDIR)
        self.volume.rename(old_parent, name_old, new_parent, name_new, target, now)

    # -- files ----------------------------------------------------------------------------

    def _open(self, inode: Inode, flags: int) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            self._writable()
        fh = self._new_handle()
        self._files[fh] = inode
        inode.opens += 1
        self.volume.forget(inode)  # a deleted file opened again (/proc/PID/fd) counts again
        # Not direct_io, even for write-only handles, though it would spare the
        # getxattr(security.capability) the kernel sends before each write through the page
        # cache: a direct write of an O_SYNC/O_DSYNC descriptor or with RWF_SYNC/RWF_DSYNC
        # gets no fsync from the kernel (the flag rides in the WRITE request, which pyfuse3
        # does not pass to `write`), so it would return before the bytes are durable.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_errno_guard
    async def open(self, inode, flags, ctx):
        node = self._inode(inode)
        if node.extents is None:
            raise _fail(errno.EISDIR if node.entries is not None else errno.EINVAL)
        if flags & os.O_TRUNC and node.size:  # the kernel leaves O_TRUNC to us (atomic_o_trunc)
            self._writable()
            now = time.time_ns()
            self.volume.set_attrs(node, size=0, mtime_ns=now, ctime_ns=now)
        return self._open(node, flags)

    @_errno_guard
    async def create(self, parent_inode, name, mode, flags, ctx):
        mode = stat.S_IFREG | (stat.S_IMODE(mode) & ~ctx.umask)
        entry = self._new(self._dir(parent_inode), name, mode, ctx)
        return self._open(self._inodes[entry.st_ino], flags), entry

    @_errno_guard
    async def read(self, fh, off, size):
        return self.volume.read(self._files[fh], off, size)

    @_errno_guard
    async def write(self, fh, off, buf):
        self._writable()
        # O_APPEND needs nothing here: the kernel sends the end of the file as *off* (under
        # its inode lock), and only it knows whether fcntl(F_SETFL) has cleared the flag since.
        self.volume.write(self._files[fh], off, buf, time.time_ns())  # refuses what passes the size
        return len(buf)

    async def flush(self, fh):
        # write() already put every byte in the store, so close() has nothing to flush.
        # ENOSYS tells the kernel to stop sending FLUSH at all: one round trip less per close.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_errno_guard
    async def release(self, fh):
        inode = self._files.pop(fh)
        inode.opens -= 1
        self.volume.forget(inode)

    @_errno_guard
    async def fsync(self, fh, datasync):
        self.volume.sync()

    # -- directories ----------------------------------------------------------------------

    @_errno_guard
    async def opendir(self, inode, ctx):
        directory = self._dir(inode)
        fh = self._new_handle()
        self._listings[fh] = (directory, Listing(directory.entries))
        return fh

    @_errno_guard
    async def readdir(self, fh, start_id, token):
        directory, listing = self._listings[fh]
        if directory.nlink == 0:
            return  # removed while open: nothing more to list
        # "." and ".." first, at offsets 1 and 2 (entries start at 3).  The kernel takes no
        # reference for them, so their lookup counts stay as they are.
        parent = self._inodes.get(directory.parent or directory.ino, directory)
        for offset, name, node in ((1, b".", directory), (2, b"..", parent)):
            if start_id < offset and not pyfuse3.readdir_reply(
                token, name, self._attrs(node), offset
            ):
                return
        for name, ino, offset in listing.after(start_id):
            child = self._inodes[ino]
            if not pyfuse3.readdir_reply(token, name, self._attrs(child), offset):
                break
            child.lookups += 1

    async def releasedir(self, fh):
        del self._listings[fh]

    @_errno_guard
    async def fsyncdir(self, fh, datasync):
        self.volume.sync()

    @_errno_guard
    async def statfs(self, ctx):
        disk = self.volume.disk_stats()
        stats = pyfuse3.StatvfsData()
        stats.f_bsize = stats.f_frsize = disk.f_frsize
        blocks, free = disk.f_blocks, disk.f_bavail
        volume = self.volume
        if volume.quota:  # a sized volume shows its own size, used and free space
            blocks = volume.quota // disk.f_frsize
            used = -(-volume.used_by_files // disk.f_frsize)
            free = max(0, min(free, blocks - used))
        stats.f_blocks = blocks
        stats.f_bfree = stats.f_bavail = free
        if volume.inode_limit:
            stats.f_files = volume.inode_limit
            stats.f_ffree = stats.f_favail = max(0, volume.inode_limit - volume.inodes_used)
        else:
            stats.f_files = volume.inodes_used + disk.f_ffree
            stats.f_ffree = stats.f_favail = disk.f_ffree
        stats.f_namemax = NAME_MAX
        return stats

    # -- extended attributes --------------------------------------------------------------

    @staticmethod
    def _check_xattr_name(name: bytes) -> None:
        """Refuse names outside Linux's namespaces as ext4 does: bare prefix EINVAL, else
        an unknown namespace EOPNOTSUPP."""
        for prefix in XATTR_NAMESPACES:
            if name.startswith(prefix):
                if name == prefix:
                    raise _fail(errno.EINVAL)
                return
        raise _fail(errno.EOPNOTSUPP)

    @_errno_guard
    async def setxattr(self, inode, name, value, ctx):
        self._writable()
        node = self._inode(inode)
        if len(name) > XATTR_NAME_MAX or not name:
            raise _fail(errno.ERANGE)
        self._check_xattr_name(name)
        if len(value) > XATTR_SIZE_MAX:
            raise _fail(errno.E2BIG)
        if name.startswith(b"trusted.") and ctx.uid != 0:
            raise _fail(errno.EPERM)
        if name.startswith(b"system."):
            raise _fail(errno.EOPNOTSUPP)  # no POSIX ACLs yet
        if name.startswith(b"user.") and node.extents is None and node.entries is None:
            raise _fail(errno.EPERM)  # Linux allows user.* only on files and directories
        self.volume.set_xattr(node, name, value, time.time_ns())

    @_errno_guard
    async def getxattr(self, inode, name, ctx):
        node = self._inode(inode)
        if not node.xattrs and name == CAPS_XATTR:  # asked before every write: answer first
            raise _fail(pyfuse3.ENOATTR)
        self._check_xattr_name(name)
        if node.xattrs is None or name not in node.xattrs:
            raise _fail(pyfuse3.ENOATTR)
        if name.startswith(b"trusted.") and ctx.uid != 0:
            raise _fail(pyfuse3.ENOATTR)
        return node.xattrs[name]

    @_errno_guard
    async def listxattr(self, inode, ctx):
        node = self._inode(inode)
        if not node.xattrs:
            return []
        return [n for n in node.xattrs if ctx.uid == 0 or not n.startswith(b"trusted.")]

    @_errno_guard
    async def removexattr(self, inode, name, ctx):
        self._writable()
        node = self._inode(inode)
        self._check_xattr_name(name)
        if node.xattrs is None or name not in node.xattrs:
            raise _fail(pyfuse3.ENOATTR)
        if name.startswith(b"trusted.") and ctx.uid != 0:
            raise _fail(errno.EPERM)
        self.volume.set_xattr(node, name, None, time.time_ns())
