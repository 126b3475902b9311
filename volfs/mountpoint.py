"""Mount points the root daemon can trust: resolved once, without symlinks, then used by fd.

Mount points often lie in directories that containers can write (the parent-bind recipe in
the README).  A container could replace one with a symlink to any host directory while its
volume is down; a daemon that resolved the path string again, as root, would then create
directories and mount over whatever the symlink names.  So every mount point is opened here
component by component with ``O_NOFOLLOW`` (a symlink anywhere in it is refused, never
followed), the result is held as a descriptor, and mounts are made on that descriptor
(sysmount.py).  Directories are created only on an explicit ``volfsd mount``, never while a
volume heals.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from types import TracebackType

from volfs import mounts, sysmount
from volfs.errors import VolfsError

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def normalize(text: object) -> Path:
    """An absolute, normalised path from a mount point argument; no symlink is resolved."""
    if not isinstance(text, str) or "\0" in text or not text:
        raise VolfsError("a mount point must be a non-empty path")
    try:
        encoded = text.encode()
    except UnicodeEncodeError:
        raise VolfsError("mount point paths must be valid UTF-8: rename the directory") from None
    if not text.startswith("/"):
        raise VolfsError(f"mount point {text[:200]!r} is relative: give an absolute path")
    if len(encoded) > 4000:
        raise VolfsError("mount point path is too long")
    # Lexical: on a path without symlinks (the only kind accepted) it is the real one.
    return Path("/" + os.path.normpath(text).lstrip("/"))


class MountPoint:
    """A directory opened without following symlinks, held by an ``O_PATH`` descriptor.

    If a mount is on the directory, the descriptor refers to that mount's root (the topmost).
    """

    def __init__(self, path: Path, fd: int, parent_fd: int) -> None:
        self.path = path
        self.fd = fd
        self._parent_fd = parent_fd

    def __enter__(self) -> MountPoint:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        for fd in (self.fd, self._parent_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self._parent_fd = -1

    def top(self, table: list[mounts.MountEntry] | None = None) -> mounts.MountEntry | None:
        """The mount whose root this directory is, or None for a plain directory."""
        table = mounts.mount_table() if table is None else table
        entry = mounts.by_id(table).get(sysmount.mount_id(self.fd))
        if entry is None or entry.mountpoint != os.readlink(f"/proc/self/fd/{self.fd}"):
            return None
        return entry

    def enclosing_volume(self, table: list[mounts.MountEntry]) -> mounts.MountEntry | None:
        """The volfs mount this directory lies inside of (a nested mount point), if any."""
        return _enclosing_volume(self._parent_fd, table)

    def is_dead(self) -> bool:
        """Whether the FUSE server of the mount here is gone ("not connected")."""
        try:
            # statfs, not stat: the kernel answers stat from its cache even when the server
            # is gone, but always asks the server for statfs.
            os.statvfs(self.fd)
        except OSError as exc:
            return exc.errno == errno.ENOTCONN
        return False

    def is_empty(self) -> bool:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.fd)
        try:
            return not os.listdir(fd)
        finally:
            os.close(fd)


def open_mountpoint(path: Path, create: bool = False) -> MountPoint:
    """Open the directory *path* (normalised, absolute) without following any symlink.

    With *create*, missing directories are made (mode 0755), each relative to its parent's
    descriptor.  Raises VolfsError naming the component that is a symlink, missing or not a
    directory.
    """
    fd = os.open("/", _DIR_FLAGS)
    parent = -1
    try:
        for i, part in enumerate(path.parts[1:], start=2):
            where = Path(*path.parts[:i])
            child = _open_child(fd, part, where, path, create)
            if parent >= 0:
                os.close(parent)
            parent, fd = fd, child
        if parent < 0:
            raise VolfsError("/ cannot be a mount point")
        return MountPoint(path, fd, parent)
    except BaseException:
        for f in (fd, parent):
            if f >= 0:
                os.close(f)
        raise


def _open_child(fd: int, part: str, where: Path, path: Path, create: bool) -> int:
    for _ in range(3):  # a directory made or removed meanwhile by someone else: look again
        try:
            return os.open(part, _DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise VolfsError(f"mount point {path}: {where} does not exist") from None
            enclosing = _enclosing_volume(fd, mounts.mount_table())
            if enclosing is not None:  # refused before anything is made in the other volume
                raise _nested(path, enclosing) from None
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                continue
            except OSError as exc:
                raise VolfsError(f"cannot create mount point {path}: {exc.strerror}") from None
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise VolfsError(f"mount point {path}: {where}: {exc.strerror}") from None
            try:
                is_link = stat.S_ISLNK(os.lstat(part, dir_fd=fd).st_mode)
            except OSError:
                continue
            if is_link:
                raise VolfsError(
                    f"mount point {path}: {where} is a symlink; volfs never follows symlinks "
                    "in mount points: give the path without them"
                ) from None
            raise VolfsError(f"mount point {path}: {where} is not a directory") from None
    raise VolfsError(f"mount point {path}: {where} keeps changing")


def _enclosing_volume(fd: int, table: list[mounts.MountEntry]) -> mounts.MountEntry | None:
    """The volfs mount that directory *fd* is on or under, if any."""
    by_id = mounts.by_id(table)
    entry = by_id.get(sysmount.mount_id(fd))
    seen: set[int] = set()
    while entry is not None and entry.mount_id not in seen:
        if entry.fstype == mounts.FSTYPE:
            return entry
        seen.add(entry.mount_id)
        entry = by_id.get(entry.parent_id)
    return None


def _nested(path: Path, enclosing: mounts.MountEntry) -> VolfsError:
    return VolfsError(
        f"mount point {path} is inside volume {enclosing.source} (mounted at "
        f"{enclosing.mountpoint}): volumes cannot be nested; use another directory"
    )


def bind(source: MountPoint, target: MountPoint, read_only: bool, beneath: bool = False) -> int:
    """Mount a copy of the mount at *source* on *target* (read-only from the start if asked);
    with *beneath*, under the mount already on *target*.  Return the new mount's id."""
    tree = sysmount.clone_mount(source.fd)
    try:
        if read_only:
            sysmount.set_read_only(tree)
        sysmount.attach(tree, target.fd, beneath=beneath)
        return sysmount.mount_id(tree)
    finally:
        os.close(tree)


#: What `prepare` found on a mount point.
ATTACH = "attach"  #: an empty directory: mount on it
REPLACE = "replace"  #: a dead mount of the same volume: mount beneath it, then detach it
PRESENT = "present"  #: the live mount of the volume is there already


def prepare(target: MountPoint, name: str, device: str = "") -> str:
    """Check that volume *name* (served from FUSE device *device*, if known) may be mounted on
    *target*, and say how (ATTACH, REPLACE or PRESENT); raise VolfsError if it may not."""
    table = mounts.mount_table()
    enclosing = target.enclosing_volume(table)
    if enclosing is not None:
        raise _nested(target.path, enclosing)
    top = target.top(table)
    if top is None:
        try:
            empty = target.is_empty()
        except PermissionError:
            raise VolfsError(f"cannot read mount point {target.path}: permission denied") from None
        if not empty:
            raise VolfsError(f"mount point {target.path} is not empty: use an empty directory")
        return ATTACH
    if device and top.device == device:
        return PRESENT
    if top.fstype == mounts.FSTYPE and top.source == name and target.is_dead():
        return REPLACE
    raise VolfsError(f"{target.path} is already a mount point ({top.fstype} {top.source})")
