"""What the daemon remembers in its runtime directory across its own restarts.

* The mounts it made on request (`RememberedMounts`): a daemon that restarts (a crash, an
  upgrade, ``systemctl restart``) brings them back.  Mounts a config file declares are not
  remembered: the config brings them back.  ``RUN_DIR/mounts.msgpack``: a list of ``[name,
  path, read_only]``.
* The Docker mounts that hold each volume (`ContainerClaims`): Docker calls the plugin's
  ``Mount`` once per container mount and ``Unmount`` when it ends, and the last ``Unmount``
  unmounts.  ``RUN_DIR/docker-claims.msgpack``: a list of ``[name, mount_id, since, replaced]``,
  one per ``Mount`` not yet unmounted (a multiset: Docker may repeat an id); *since* is on
  `boot_clock`, *replaced* the device of the mount a heal replaced under it ("" if none).

A reboot clears /run and both with it, as it ends every mount and container they describe.
Each file is replaced whole (written to a temporary file, then renamed over it).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import msgpack

log = logging.getLogger(__name__)

FILE_NAME = "mounts.msgpack"
CLAIMS_FILE = "docker-claims.msgpack"

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
        return [e for e in _read(self.path) if isinstance(e, list) and len(e) == 3]

    def remember(self, name: str, path: Path, read_only: bool) -> None:
        """Remember that volume *name* is mounted at *path*."""
        self._write([*self._others(path), [name, str(path), read_only]])

    def forget(self, path: Path) -> None:
        """Forget the mount at *path*, if one is remembered."""
        self._write(self._others(path))

    def _others(self, path: Path) -> list[Entry]:
        return [e for e in self.entries() if e[1] != str(path)]

    def _write(self, entries: list[Entry]) -> None:
        _replace(self.path, entries)


def _read(path: Path) -> list[object]:
    """The list in *path*; empty if the file is missing, unreadable or not a list."""
    try:
        entries = msgpack.unpackb(path.read_bytes())
    except (OSError, ValueError, msgpack.UnpackException):
        return []
    return entries if isinstance(entries, list) else []


def _replace(path: Path, entries: Sequence[object]) -> None:
    """Write *entries* to *path* whole: a reader sees the old list or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(os.open(tmp, flags, 0o600), "wb") as f:
        f.write(msgpack.packb(entries))
    tmp.rename(path)


def boot_clock() -> float:
    """Seconds since boot, suspend included: steps of the wall clock (NTP at boot, when Docker
    restarts its containers) do not age a claim, and /run, where claims live, ends with the
    boot."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Claim(NamedTuple):
    """One Docker ``Mount`` of a volume that has not been unmounted yet."""

    name: str  #: the volume
    mount_id: str  #: the id Docker gave the ``Mount``: one per container mount, not per container
    since: float  #: when it was made, on `boot_clock`
    #: The device ("major:minor") of the mount that a worker's heal replaced while this claim
    #: held it: its container still holds that dead mount.  "" if none; "?" if not known.
    replaced: str


class ContainerClaims:
    """The Docker mounts that hold each volume, as the daemon of *run_dir* remembers them.

    A volume with claims stays mounted for Docker; `remove` of the last one lets it go.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / CLAIMS_FILE

    def all(self) -> list[Claim]:
        """Every claim; malformed entries (a hand-edited or truncated file) are dropped."""
        claims = []
        for entry in _read(self.path):
            if not (isinstance(entry, list) and len(entry) == 4):
                continue
            name, mount_id, since, replaced = entry
            if isinstance(name, str) and isinstance(mount_id, str) and isinstance(since, float):
                if not isinstance(replaced, str):
                    replaced = "?" if replaced else ""  # not a device: known only to be set
                claims.append(Claim(name, mount_id, since, replaced))
        return claims

    def of(self, name: str) -> list[Claim]:
        """The claims on volume *name*, oldest first."""
        return [c for c in self.all() if c.name == name]

    def add(self, name: str, mount_id: str) -> None:
        self._write([*self.all(), Claim(name, mount_id, boot_clock(), "")])

    def remove(self, name: str, mount_id: str) -> bool:
        """Drop one claim of *mount_id* on *name*; whether there was one."""
        claims = self.all()
        for i, claim in enumerate(claims):
            if claim.name == name and claim.mount_id == mount_id:
                del claims[i]
                self._write(claims)
                return True
        return False

    def drop(self, name: str) -> list[Claim]:
        """Drop every claim on *name*; the claims dropped."""
        claims = self.all()
        self._write([c for c in claims if c.name != name])
        return [c for c in claims if c.name == name]

    def mark_replaced(self, name: str, device: str) -> None:
        """Note that *name*'s mount of *device* was replaced under its claims (those not
        marked already: their containers hold an older dead mount), and log what that means
        for them; a file that cannot be written is logged too (the heal is done all the same)."""
        try:
            claims = self.all()
            marked = [c._replace(replaced=device) if c.name == name and not c.replaced else c
                      for c in claims]  # fmt: skip
            self._write(marked)
        except OSError as exc:
            log.error("volume %s: cannot note its replaced mount in %s: %s", name, self.path, exc,
                      extra={"volume": name})  # fmt: skip
            return
        if any(c.name == name for c in claims):
            log.error("volume %s: its Docker containers keep the dead mount until they are "
                      "restarted (Docker binds volumes privately)", name,
                      extra={"volume": name})  # fmt: skip

    def _write(self, claims: list[Claim]) -> None:
        _replace(self.path, [list(c) for c in claims])
