"""Exclusive ownership of a directory by one process: a flock'ed file holding the owner's pid.

The lock lasts as long as the returned file descriptor stays open, so it goes away with its
process however that process ends; the pid in the file only names the owner in messages.

A lock file is opened without following a symbolic link and must be a regular file: a link
planted in its place must not make us lock (or write our pid into) a file elsewhere, and a FIFO
must not hang the open (hence ``O_NONBLOCK``, which changes nothing for a regular file).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from volfs.errors import StoreError

_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class LockHeld(Exception):
    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


class NotALockFile(StoreError):
    """The lock file's name holds something else (a symbolic link, a directory, a FIFO)."""

    def __init__(self, path: str, kind: str) -> None:
        super().__init__(
            f"lock file {path} is {kind}, not a regular file: volfs follows no links and "
            "locks nothing else there; remove it"
        )
        self.path = path


def _path(name: str | os.PathLike[str], dir_fd: int | None) -> str:
    """*name* as a full path, for messages (the directory's path comes from /proc)."""
    if dir_fd is None:
        return os.fspath(name)
    try:
        return os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), os.fspath(name))
    except OSError:
        return os.fspath(name)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device node"
    return "not a regular file"


def _open(name: str | os.PathLike[str], flags: int, dir_fd: int | None) -> int:
    """Open lock file *name*; NotALockFile if its name holds anything but a regular file."""
    try:
        fd = os.open(name, flags | _FLAGS, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise
        try:
            mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
        except OSError:
            raise exc from None
        raise NotALockFile(_path(name, dir_fd), _kind(mode)) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotALockFile(_path(name, dir_fd), _kind(mode))
    return fd


def take(name: str, dir_fd: int) -> int:
    """Lock file *name* in *dir_fd* and write our pid into it; raise `LockHeld` if taken."""
    fd = _open(name, os.O_RDWR | os.O_CREAT, dir_fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        raise LockHeld(holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def take_in(directory: str | os.PathLike[str], name: str) -> int:
    """`take` lock file *name* in *directory*, which must not be a symlink (a volume's own
    directory: fsck and export hold its lock so that no worker serves it meanwhile)."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return take(name, dir_fd)
    finally:
        os.close(dir_fd)


def is_held(path: str | os.PathLike[str], dir_fd: int | None = None) -> bool:
    """Whether some process holds the lock file at *path* (in *dir_fd*, if given) right now."""
    try:
        fd = _open(path, os.O_RDONLY, dir_fd)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def holder(path: str | os.PathLike[str], dir_fd: int | None = None) -> str:
    """The pid the lock file at *path* names ("unknown" if it names none)."""
    try:
        fd = _open(path, os.O_RDONLY, dir_fd)
    except FileNotFoundError:
        return "unknown"
    try:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)
