"""Errors that reach a user as one line of text (never as a traceback)."""

from __future__ import annotations


class VolfsError(Exception):
    """Something the user can act on; ``str()`` is the whole message."""


class StoreError(VolfsError):
    """The store root or a volume directory cannot be used as it is."""


class VolumeDamaged(StoreError):
    """A volume's metadata fails its checksums in a place that cannot be a torn write."""


class DataDamaged(Exception):
    """A data block failed its checksum; the FUSE layer answers EIO."""


class NoSpace(OSError):
    """An operation would take a volume past its size or inode limit (errno ENOSPC): an
    answer to give the caller, not a failure of the store."""
