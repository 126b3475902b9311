"""Linux's file-descriptor mount calls, which Python's os module lacks.

The daemon runs as root and makes mounts in directories that containers can write.  A mount
call that takes a path string resolves that path again when it runs, so a symlink planted in
between would steer it anywhere on the host.  These calls work on descriptors instead: the
caller resolves a directory once (without following symlinks, see mountpoint.py) and mounts on
exactly that directory.

- `clone_mount` (``open_tree(OPEN_TREE_CLONE)``): a detached copy of a mount, like a bind.
- `set_read_only` (``mount_setattr``): made read-only *before* it is attached, so a read-only
  path is never writable, not even for an instant.
- `attach` (``move_mount``): put a detached mount onto a directory descriptor; with
  ``beneath=True`` under the mount already there (Linux 6.5), so that a dead mount can be
  replaced without the directory under it being exposed in between.
- `detach` (``umount2(MNT_DETACH)``) of the mount a descriptor refers to.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

# x86_64 and aarch64 share these numbers (the new mount API came after the tables merged).
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442

_OPEN_TREE_CLONE = 1
_OPEN_TREE_CLOEXEC = os.O_CLOEXEC
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_MOVE_MOUNT_F_EMPTY_PATH = 0x04
_MOVE_MOUNT_T_EMPTY_PATH = 0x40
_MOVE_MOUNT_BENEATH = 0x200
_MOUNT_ATTR_RDONLY = 0x1
_MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def supported() -> bool:
    """Whether this machine has the calls (Linux on x86_64 or aarch64)."""
    return platform.system() == "Linux" and platform.machine() in ("x86_64", "aarch64")


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


def clone_mount(fd: int) -> int:
    """A detached copy of the mount whose root *fd* is (not of its submounts); a new fd."""
    return _check(
        _libc.syscall(
            _SYS_OPEN_TREE,
            ctypes.c_int(fd),
            b"",
            ctypes.c_uint(_OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC | _AT_EMPTY_PATH),
        ),
        "open_tree",
    )


def set_read_only(tree: int) -> None:
    attr = _MountAttr(_MOUNT_ATTR_RDONLY, 0, 0, 0)
    _check(
        _libc.syscall(
            _SYS_MOUNT_SETATTR,
            ctypes.c_int(tree),
            b"",
            ctypes.c_uint(_AT_EMPTY_PATH),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        ),
        "mount_setattr",
    )


def attach(tree: int, target: int, beneath: bool = False) -> None:
    """Mount the detached *tree* on the directory *target* refers to (under its top mount if
    *beneath*)."""
    flags = _MOVE_MOUNT_F_EMPTY_PATH | _MOVE_MOUNT_T_EMPTY_PATH
    if beneath:
        flags |= _MOVE_MOUNT_BENEATH
    _check(
        _libc.syscall(
            _SYS_MOVE_MOUNT,
            ctypes.c_int(tree),
            b"",
            ctypes.c_int(target),
            b"",
            ctypes.c_uint(flags),
        ),
        "move_mount",
    )


def detach(fd: int) -> None:
    """Lazily unmount the mount whose root *fd* refers to.

    Through /proc/self/fd: the magic link leads to exactly the mount the descriptor holds,
    whatever has been mounted over or renamed since, and no path string is resolved.
    """
    result = _libc.umount2(f"/proc/self/fd/{fd}".encode(), _MNT_DETACH)
    if result < 0:
        code = ctypes.get_errno()
        if code != errno.EINVAL:  # not mounted (any more): the goal is reached
            raise OSError(code, f"umount2: {os.strerror(code)}")


def mount_id(fd: int) -> int:
    """The id of the mount *fd* is on (as /proc/self/mountinfo numbers them)."""
    found = fdinfo_mount_id(f"/proc/self/fdinfo/{fd}")
    if found is None:
        raise OSError(errno.ENOTSUP, "fdinfo shows no mnt_id")
    return found


def fdinfo_mount_id(path: str) -> int | None:
    """The ``mnt_id`` an fdinfo file (``/proc/PID/fdinfo/N``) shows; None if it is gone."""
    try:
        with open(path) as info:
            for line in info:
                if line.startswith("mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None
