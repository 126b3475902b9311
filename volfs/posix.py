"""The POSIX rules of a volume, as steps over a `volfs.model.VolumeView`.

Each public method of `PosixRules` is one operation as the FUSE layer asks it: it looks the
names up, decides by POSIX which errno refuses it (raised as `pyfuse3.FUSEError`), and makes
the change through the view, all inside one step, so a model runs the check and the change as
one atomic unit (`VolumeModel.run`).  Every check comes before the change it guards: a refusal
changes nothing, so a step can be run again.

Access checks by mode (read, write, search, the sticky bit, chmod and chown by the owner) are
not here: the mount has ``default_permissions``, so the kernel makes them before it asks.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable

from pyfuse3 import ENOATTR, FUSEError

from volfs.model import Node, VolumeView

NAME_MAX = 255
PATH_MAX = 4096
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.", b"system.")
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
#: fallocate(2)'s modes (<linux/falloc.h>), and the ones volfs does.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOCATE_MODES = (0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
#: The largest file size (the kernel's MAX_LFS_FILESIZE on 64-bit Linux).
MAX_FILE_SIZE = (1 << 63) - 1
#: File capabilities: the kernel asks for them before every write through the page cache.
CAPS_XATTR = b"security.capability"
ROOT_INO = 1
_SETGID_TYPES = (stat.S_IFDIR,)
_S_IFMT, _S_IFDIR = 0o170000, stat.S_IFDIR


def _fail(code: int) -> FUSEError:
    return FUSEError(code)


def is_dir(node: Node) -> bool:
    return stat.S_ISDIR(node.mode)


def is_file(node: Node) -> bool:
    return stat.S_ISREG(node.mode)


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise _fail(errno.ENAMETOOLONG)


def check_xattr_name(name: bytes) -> None:
    """Refuse names outside Linux's namespaces as ext4 does: bare prefix EINVAL, else an
    unknown namespace EOPNOTSUPP."""
    for prefix in XATTR_NAMESPACES:
        if name.startswith(prefix):
            if name == prefix:
                raise _fail(errno.EINVAL)
            return
    raise _fail(errno.EOPNOTSUPP)


def existing(view: VolumeView, ino: int) -> Node:
    """The inode *ino*; ENOENT if there is none."""
    inode = view.inode(ino)
    if inode is None:
        raise _fail(errno.ENOENT)
    return inode


def directory(view: VolumeView, ino: int) -> Node:
    """The directory *ino*; ENOENT or ENOTDIR."""
    inode = view.inode(ino)
    if inode is None:
        raise _fail(errno.ENOENT)
    if inode.mode & _S_IFMT != _S_IFDIR:  # is_dir, inline: every lookup asks
        raise _fail(errno.ENOTDIR)
    return inode


def child(view: VolumeView, parent: Node, name: bytes) -> Node:
    """The inode *parent*/*name*; ENAMETOOLONG or ENOENT."""
    node = view.child(parent, name)
    if node is None:
        check_name(name)
        raise _fail(errno.ENOENT)
    return node


def is_ancestor(view: VolumeView, ancestor: Node, inode: Node) -> bool:
    """Whether *ancestor* is *inode* or one of the directories above it."""
    ino = inode.ino
    while True:
        if ino == ancestor.ino:
            return True
        if ino == ROOT_INO:
            return False
        ino = existing(view, ino).parent


class PosixRules:
    """The operations of one mount of a volume: read-only or not, with a clock for times.

    Every method but the helpers is a step: its first argument is the view of the step.
    """

    def __init__(self, read_only: bool = False, clock: Callable[[], int] = time.time_ns) -> None:
        self.read_only = read_only
        self.clock = clock  #: nanoseconds since the epoch, for the times a change sets

    def writable(self) -> None:
        if self.read_only:
            raise _fail(errno.EROFS)

    # -- lookups and attributes -----------------------------------------------------------

    def lookup(self, view: VolumeView, parent_ino: int, name: bytes) -> Node | None:
        """The inode *name* in directory *parent_ino* names, or None (a negative entry)."""
        node = view.child(directory(view, parent_ino), name)
        if node is None:
            check_name(name)
        return node

    def setattr(
        self,
        view: VolumeView,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        ctime_ns: int | None = None,
    ) -> Node:
        """Change what is given (a mode's permission bits only); the change time is now
        unless given, and a truncation is a modification."""
        node = existing(view, ino)
        self.writable()
        now = self.clock()
        if size is not None and not is_file(node):
            raise _fail(errno.EISDIR if is_dir(node) else errno.EINVAL)
        if mtime_ns is None and size is not None:
            mtime_ns = now
        view.set_attrs(
            node,
            mode=None if mode is None else (node.mode & ~0o7777) | (mode & 0o7777),
            uid=uid,
            gid=gid,
            size=size,
            atime_ns=atime_ns,
            mtime_ns=mtime_ns,
            ctime_ns=now if ctime_ns is None else ctime_ns,
        )
        return node

    @staticmethod
    def readlink(view: VolumeView, ino: int) -> bytes:
        node = existing(view, ino)
        if node.target is None:
            raise _fail(errno.EINVAL)
        return node.target

    # -- creating and removing names ------------------------------------------------------

    def new(
        self,
        view: VolumeView,
        parent_ino: int,
        name: bytes,
        mode: int,
        uid: int,
        gid: int,
        rdev: int = 0,
        target: bytes | None = None,
    ) -> Node:
        """Create *name* in *parent_ino* owned by *uid*, in *gid* unless the directory is
        setgid (then in its group, and a new directory is setgid too)."""
        parent = directory(view, parent_ino)
        self.writable()
        check_name(name)
        if view.child(parent, name) is not None:
            raise _fail(errno.EEXIST)
        if parent.mode & stat.S_ISGID:
            gid = parent.gid
            if stat.S_IFMT(mode) in _SETGID_TYPES:
                mode |= stat.S_ISGID
        now = self.clock()
        inode = view.new_inode(mode, uid, gid, rdev, now)
        if target is not None:
            inode.target = target
            inode.size = len(target)
        view.create(parent, name, inode, now)
        return existing(view, inode.ino)

    def mknod(
        self,
        view: VolumeView,
        parent_ino: int,
        name: bytes,
        mode: int,
        rdev: int,
        uid: int,
        gid: int,
        umask: int,
    ) -> Node:
        if not (
            stat.S_ISREG(mode)
            or stat.S_ISFIFO(mode)
            or stat.S_ISSOCK(mode)
            or stat.S_ISCHR(mode)
            or stat.S_ISBLK(mode)
        ):
            raise _fail(errno.EINVAL)
        mode = stat.S_IFMT(mode) | (stat.S_IMODE(mode) & ~umask)
        return self.new(view, parent_ino, name, mode, uid, gid, rdev=rdev)

    def mkdir(
        self, view: VolumeView, parent_ino: int, name: bytes, mode: int, uid: int, gid: int,
        umask: int,
    ) -> Node:  # fmt: skip
        mode = stat.S_IFDIR | (stat.S_IMODE(mode) & ~umask)
        return self.new(view, parent_ino, name, mode, uid, gid)

    def symlink(
        self, view: VolumeView, parent_ino: int, name: bytes, target: bytes, uid: int, gid: int
    ) -> Node:
        if len(target) >= PATH_MAX:
            raise _fail(errno.ENAMETOOLONG)
        return self.new(view, parent_ino, name, stat.S_IFLNK | 0o777, uid, gid, target=target)

    def link(self, view: VolumeView, ino: int, parent_ino: int, name: bytes) -> Node:
        self.writable()
        node = existing(view, ino)
        parent = directory(view, parent_ino)
        check_name(name)
        if is_dir(node):
            raise _fail(errno.EPERM)
        if view.child(parent, name) is not None:
            raise _fail(errno.EEXIST)
        if node.nlink == 0:
            raise _fail(errno.ENOENT)
        view.link(node, parent, name, self.clock())
        return node

    def unlink(self, view: VolumeView, parent_ino: int, name: bytes) -> None:
        self.writable()
        parent = directory(view, parent_ino)
        node = child(view, parent, name)
        if is_dir(node):
            raise _fail(errno.EISDIR)
        view.unlink(parent, name, node, self.clock())

    def rmdir(self, view: VolumeView, parent_ino: int, name: bytes) -> None:
        self.writable()
        parent = directory(view, parent_ino)
        node = child(view, parent, name)
        if not is_dir(node):
            raise _fail(errno.ENOTDIR)
        if view.entry_count(node):
            raise _fail(errno.ENOTEMPTY)
        view.unlink(parent, name, node, self.clock())

    def rename(
        self,
        view: VolumeView,
        old_parent_ino: int,
        old_name: bytes,
        new_parent_ino: int,
        new_name: bytes,
        flags: int,
    ) -> None:
        """rename(2) and renameat2(2)'s RENAME_NOREPLACE and RENAME_EXCHANGE."""
        self.writable()
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (
            RENAME_NOREPLACE | RENAME_EXCHANGE
        ):
            raise _fail(errno.EINVAL)
        old_parent = directory(view, old_parent_ino)
        new_parent = directory(view, new_parent_ino)
        check_name(new_name)
        moved = child(view, old_parent, old_name)
        target = view.child(new_parent, new_name)
        now = self.clock()
        if flags & RENAME_EXCHANGE:
            if target is None:
                raise _fail(errno.ENOENT)
            for node, other_parent in ((moved, new_parent), (target, old_parent)):
                if is_dir(node) and is_ancestor(view, node, other_parent):
                    raise _fail(errno.EINVAL)
            if moved is not target:
                view.exchange(old_parent, old_name, new_parent, new_name, now)
            return
        if is_dir(moved) and is_ancestor(view, moved, new_parent):
            raise _fail(errno.EINVAL)
        if target is not None:
            if flags & RENAME_NOREPLACE:
                raise _fail(errno.EEXIST)
            if target is moved:
                return  # two links to one inode: POSIX says do nothing
            if is_dir(moved):
                if not is_dir(target):
                    raise _fail(errno.ENOTDIR)
                if view.entry_count(target):
                    raise _fail(errno.ENOTEMPTY)
            elif is_dir(target):
                raise _fail(errno.EISDIR)
        view.rename(old_parent, old_name, new_parent, new_name, target, now)

    # -- files ----------------------------------------------------------------------------

    def create(self, view: VolumeView, parent_ino: int, name: bytes, mode: int, uid: int,
               gid: int, flags: int) -> Node:  # fmt: skip
        """open(O_CREAT): a new regular file; without O_EXCL, the file another host of a
        shared volume made at *name* since this kernel found the name missing, opened as
        `open` would (locally the kernel asks only for a name that is missing)."""
        try:
            return self.new(view, parent_ino, name, mode, uid, gid)
        except FUSEError as exc:
            if exc.errno != errno.EEXIST or flags & os.O_EXCL:
                raise
        found = view.child(directory(view, parent_ino), name)
        assert found is not None  # `new` found it in this very step
        return self.open(view, found.ino, flags)

    def open(self, view: VolumeView, ino: int, flags: int) -> Node:
        """The regular file to open, truncated first for O_TRUNC."""
        node = existing(view, ino)
        if not is_file(node):
            raise _fail(errno.EISDIR if is_dir(node) else errno.EINVAL)
        if flags & os.O_TRUNC and node.size:  # the kernel leaves O_TRUNC to us (atomic_o_trunc)
            self.writable()
            now = self.clock()
            view.set_attrs(node, size=0, mtime_ns=now, ctime_ns=now)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            self.writable()
        return node

    def write(self, view: VolumeView, node: Node, offset: int, data: bytes) -> int:
        """Write to an open file; refused (`NoSpace`) past the volume's size."""
        self.writable()
        # O_APPEND needs nothing here: the kernel sends the end of the file as *offset* (under
        # its inode lock), and only it knows whether fcntl(F_SETFL) has cleared the flag since.
        view.write(node, offset, data, self.clock())
        return len(data)

    def fallocate(self, view: VolumeView, node: Node, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on an open file: allocate (mode 0: the file grows to the end of the
        range; FALLOC_FL_KEEP_SIZE: it does not) or punch a hole (FALLOC_FL_PUNCH_HOLE, which
        needs FALLOC_FL_KEEP_SIZE); other modes EOPNOTSUPP, a range that does not fit the
        volume's size `NoSpace`."""
        if mode not in _FALLOCATE_MODES:
            raise _fail(errno.EOPNOTSUPP)
        if offset < 0 or length <= 0:
            raise _fail(errno.EINVAL)
        if offset + length > MAX_FILE_SIZE:
            raise _fail(errno.EFBIG)
        self.writable()
        view.fallocate(node, offset, length, self.clock(),
                       keep_size=bool(mode & FALLOC_FL_KEEP_SIZE),
                       punch=bool(mode & FALLOC_FL_PUNCH_HOLE))  # fmt: skip

    @staticmethod
    def seek(view: VolumeView, node: Node, offset: int, whence: int) -> int:
        """lseek(2)'s SEEK_DATA and SEEK_HOLE on an open file (the kernel does the others):
        ENXIO at or past the end, or when no data follows."""
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise _fail(errno.EINVAL)
        found = view.seek(node, offset, whence == os.SEEK_HOLE)
        if found is None:
            raise _fail(errno.ENXIO)
        return found

    # -- extended attributes --------------------------------------------------------------

    def setxattr(self, view: VolumeView, ino: int, name: bytes, value: bytes, uid: int) -> None:
        self.writable()
        node = existing(view, ino)
        if len(name) > XATTR_NAME_MAX or not name:
            raise _fail(errno.ERANGE)
        check_xattr_name(name)
        if len(value) > XATTR_SIZE_MAX:
            raise _fail(errno.E2BIG)
        if name.startswith(b"trusted.") and uid != 0:
            raise _fail(errno.EPERM)
        if name.startswith(b"system."):
            raise _fail(errno.EOPNOTSUPP)  # no POSIX ACLs yet
        if name.startswith(b"user.") and not (is_file(node) or is_dir(node)):
            raise _fail(errno.EPERM)  # Linux allows user.* only on files and directories
        view.set_xattr(node, name, value, self.clock())

    @staticmethod
    def getxattr(view: VolumeView, ino: int, name: bytes, uid: int) -> bytes | None:
        """The value of *name*, or None for ENOATTR (returned, not raised: the kernel asks
        for security.capability before every write, and a raise through the step costs)."""
        node = existing(view, ino)
        if not node.xattrs and name == CAPS_XATTR:  # asked before every write: answer first
            return None
        check_xattr_name(name)
        if node.xattrs is None or name not in node.xattrs:
            return None
        if name.startswith(b"trusted.") and uid != 0:
            return None
        return node.xattrs[name]

    @staticmethod
    def listxattr(view: VolumeView, ino: int, uid: int) -> list[bytes]:
        node = existing(view, ino)
        if not node.xattrs:
            return []
        return [n for n in node.xattrs if uid == 0 or not n.startswith(b"trusted.")]

    def removexattr(self, view: VolumeView, ino: int, name: bytes, uid: int) -> None:
        self.writable()
        node = existing(view, ino)
        check_xattr_name(name)
        if node.xattrs is None or name not in node.xattrs:
            raise _fail(ENOATTR)
        if name.startswith(b"trusted.") and uid != 0:
            raise _fail(errno.EPERM)
        view.set_xattr(node, name, None, self.clock())
