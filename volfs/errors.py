"""Errors that reach a user as one line of text (never as a traceback).

Every :class:`VolfsError` carries an :class:`ErrorCode`. The code is what programs decide on (the
CLI, a control client, the Docker plugin); the text is for people and may change at any time.
Codes travel in control replies as their string value.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """What kind of failure an error is; stable strings, part of the control protocol."""

    INVALID = "invalid"  # bad input: a name, size, flag or request the caller can fix
    NOT_FOUND = "not-found"  # no such volume, mount or path
    EXISTS = "exists"  # a volume of that name exists already
    BUSY = "busy"  # in use (open files, containers, mounts); retry when it is not
    NOT_MOUNTED = "not-mounted"  # a path that is not a volume mount of this daemon
    ALREADY_SERVED = "already-served"  # another process serves the volume or run dir
    PERMISSION = "permission"  # the caller may not do this
    STORE = "store"  # the store root or a volume directory cannot be used as it is
    DAMAGED = "damaged"  # checksums fail where a torn write cannot explain it
    NO_SPACE = "no-space"  # past a size or inode limit, or the disk is full
    UNAVAILABLE = "unavailable"  # a daemon or worker that does not answer
    INTERNAL = "internal"  # a bug in volfs; its log says more


class VolfsError(Exception):
    """Something the user can act on; ``str()`` is the whole message, ``code`` its kind."""

    default_code = ErrorCode.INVALID

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.code: ErrorCode = code if code is not None else self.default_code


class StoreError(VolfsError):
    """The store root or a volume directory cannot be used as it is."""

    default_code = ErrorCode.STORE


class VolumeDamaged(StoreError):
    """A volume's metadata fails its checksums in a place that cannot be a torn write."""

    default_code = ErrorCode.DAMAGED


class DataDamaged(Exception):
    """A file's data cannot be read as it was written (a block fails its checksum, its
    segment is short or gone); the FUSE layer answers EIO.  Carries the inode and the file
    bytes [start, end) it concerns, so callers report them without parsing the message."""

    def __init__(self, message: str, ino: int = 0, start: int = 0, end: int = 0) -> None:
        super().__init__(message)
        self.ino, self.start, self.end = ino, start, end


class NoSpace(OSError):
    """An operation would take a volume past its size or inode limit (errno ENOSPC): an
    answer to give the caller, not a failure of the store."""
