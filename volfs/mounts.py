"""The host's mount table as volfs sees it, and detaching FUSE mounts."""

from __future__ import annotations

import errno
import os
import re
import subprocess
from pathlib import Path
from typing import NamedTuple

from volfs.errors import ErrorCode, VolfsError

FSTYPE = "fuse.volfs"


class MountEntry(NamedTuple):
    device: str  #: "major:minor"
    mountpoint: str
    fstype: str
    source: str
    options: str  #: the per-mount options (field 6): "rw" or "ro" first
    mount_id: int = 0
    parent_id: int = 0
    #: A slave of another mount (mountinfo's ``master:N``): a copy that propagation made,
    #: as in the mount namespace of a systemd service with PrivateTmp, not a bind of its own.
    propagated: bool = False

    @property
    def read_only(self) -> bool:
        return self.options.split(",")[0] == "ro"


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_table() -> list[MountEntry]:
    """Every mount of this process's mount namespace, from /proc/self/mountinfo."""
    with open("/proc/self/mountinfo") as info:
        return parse_mountinfo(info.read())


def parse_mountinfo(text: str) -> list[MountEntry]:
    """The entries of a mountinfo file (of any process's namespace)."""
    entries = []
    for line in text.splitlines():
        fields = line.split()
        sep = fields.index("-")
        entries.append(
            MountEntry(
                fields[2],
                _unescape(fields[4]),
                fields[sep + 1],
                _unescape(fields[sep + 2]),
                fields[5],
                int(fields[0]),
                int(fields[1]),
                any(f.startswith("master:") for f in fields[6:sep]),
            )
        )
    return entries


def find_mount(mountpoint: str | Path) -> MountEntry | None:
    """The topmost mount at *mountpoint*, if any."""
    path = str(mountpoint)
    found = None
    for entry in mount_table():
        if entry.mountpoint == path:
            found = entry
    return found


def by_id(table: list[MountEntry]) -> dict[int, MountEntry]:
    return {entry.mount_id: entry for entry in table}


def volfs_mounts() -> list[MountEntry]:
    return [e for e in mount_table() if e.fstype == FSTYPE]


def detach(mountpoint: str | Path, lazy: bool = False) -> VolfsError | None:
    """Unmount a FUSE mount; None on success, else fusermount3's complaint as an error (code
    BUSY when the mount is in use)."""
    args = ["fusermount3", "-uz" if lazy else "-u", str(mountpoint)]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return VolfsError(
            "fusermount3 is not installed (apt-get install fuse3)", ErrorCode.UNAVAILABLE
        )
    except subprocess.TimeoutExpired:
        return VolfsError("fusermount3 did not finish within 60 s", ErrorCode.UNAVAILABLE)
    if done.returncode == 0:
        return None
    complaint = (done.stderr.strip().splitlines() or ["failed"])[-1]
    # fusermount3 says why only in words: its umount2() errno, as strerror() spells it.
    busy = os.strerror(errno.EBUSY) in complaint
    return VolfsError(complaint, ErrorCode.BUSY if busy else ErrorCode.INVALID)
