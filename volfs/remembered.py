"""The mounts the daemon made on request, remembered in its runtime directory.

A daemon that restarts (a crash, an upgrade, ``systemctl restart``) brings them back; a reboot
clears /run and them with it.  Mounts a config file declares are not remembered: the config
brings them back.  The file is ``RUN_DIR/mounts.msgpack``: a list of ``[name, path,
read_only]``, replaced whole (written to a temporary file, then renamed over it).
"""

from __future__ import annotations

import os
from pathlib import Path

import msgpack

FILE_NAME = "mounts.msgpack"

#: One remembered mount: volume name, mount point, read-only.  As read back, the fields are
#: whatever the file held: a heal checks them before it acts on them.
Entry = list[object]


class RememberedMounts:
    """The remembered mounts of the daemon of *run_dir*."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / FILE_NAME

    def entries(self) -> list[Entry]:
        """The mounts remembered, ``[name, path, read_only]`` each; none if the file is
        missing or unreadable (a heal must go on without it)."""
        try:
            entries = msgpack.unpackb(self.path.read_bytes())
        except (OSError, ValueError, msgpack.UnpackException):
            return []
        if not isinstance(entries, list):
            return []
        return [e for e in entries if isinstance(e, list) and len(e) == 3]

    def remember(self, name: str, path: Path, read_only: bool) -> None:
        """Remember that volume *name* is mounted at *path*."""
        self._write([*self._others(path), [name, str(path), read_only]])

    def forget(self, path: Path) -> None:
        """Forget the mount at *path*, if one is remembered."""
        self._write(self._others(path))

    def _others(self, path: Path) -> list[Entry]:
        return [e for e in self.entries() if e[1] != str(path)]

    def _write(self, entries: list[Entry]) -> None:
        tmp = self.path.with_name(FILE_NAME + ".tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(tmp, flags, 0o600), "wb") as f:
            f.write(msgpack.packb(entries))
        tmp.rename(self.path)
