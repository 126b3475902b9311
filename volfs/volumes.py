"""Rules for volumes and mount points that the CLI and the daemon share.

Kept apart from the daemon so that the CLI can use them without loading trio.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path

from volfs import mounts
from volfs.errors import VolfsError
from volfs.store.root import StoreRoot

log = logging.getLogger(__name__)

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)([KMGTP]?)")
#: Largest size a volume may be given: sizes are stored as unsigned 64-bit numbers.
MAX_SIZE = 1 << 62


def parse_size(text: str | int) -> int:
    """Bytes in "512M", "10G", "1T", "1.5G", "4096" (binary units; a trailing B or iB is
    allowed)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        raw = str(text).strip().upper().removesuffix("IB").removesuffix("B")
        match = _SIZE.fullmatch(raw)
        value = int(float(match[1]) * _UNITS[match[2]]) if match else -1
    if value <= 0:
        raise VolfsError(f"invalid size {str(text)[:40]!r}: use a number with K, M, G or T")
    if value > MAX_SIZE:
        raise VolfsError(f"size {str(text)[:40]!r} is too large: at most 4096P")
    return value


def parse_inodes(text: str | int) -> int:
    """An inode limit: a whole number from 1 to 2**62 (a string of digits or an int)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        raw = str(text).strip()
        value = int(raw) if raw.isdigit() and raw.isascii() and len(raw) < 20 else -1
    if value <= 0 or value > MAX_SIZE:
        raise VolfsError(f"invalid inode limit {str(text)[:40]!r}: use a whole number from 1")
    return value


def check_mountpoint(text: object) -> Path:
    if not isinstance(text, str) or "\0" in text or not text:
        raise VolfsError("a mount point must be a non-empty path")
    try:
        encoded = text.encode()
    except UnicodeEncodeError:
        raise VolfsError("mount point paths must be valid UTF-8: rename the directory") from None
    path = Path(text)
    if not path.is_absolute():
        raise VolfsError(f"mount point {text[:200]!r} is relative: give an absolute path")
    if len(encoded) > 4000:
        raise VolfsError("mount point path is too long")
    # Resolved, so that a mount point reached through a symlink is known by the path the
    # mount table will show.
    return Path(os.path.realpath(path))


def clear_dead_mount(path: Path) -> None:
    """Detach a volfs mount at *path* whose server died ("Transport endpoint not connected")."""
    entry = mounts.find_mount(path)
    if entry is None or entry.fstype != mounts.FSTYPE:
        return
    try:
        # statvfs, not stat: the kernel answers stat from its attribute cache even when the
        # server is gone, but always asks the server for statfs.
        os.statvfs(path)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            log.warning("clearing the dead mount of %s at %s", entry.source, path)
            mounts.detach(path, lazy=True)


def prepare_mountpoint(path: Path) -> None:
    """Make *path* an empty directory that is not a mount point, or say why it cannot be."""
    clear_dead_mount(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise VolfsError(f"mount point {path} exists and is not a directory") from None
    except OSError as exc:
        raise VolfsError(f"cannot create mount point {path}: {exc.strerror}") from None
    entry = mounts.find_mount(path)
    if entry is not None:
        raise VolfsError(f"{path} is already a mount point ({entry.fstype} {entry.source})")
    try:
        if any(path.iterdir()):
            raise VolfsError(f"mount point {path} is not empty: use an empty directory")
    except PermissionError:
        raise VolfsError(f"cannot read mount point {path}: permission denied") from None


def describe(
    root: StoreRoot,
    name: str,
    status: str | None = None,
    staging: Path | None = None,
    read_only: Iterable[Path] = (),
) -> dict:
    """What `ls` and `inspect` show of volume *name*.

    *status*, *staging* and *read_only* come from the daemon when it serves the volume;
    without them the status is read off the volume's lock.
    """
    try:
        header = root.header(name)
    except VolfsError as exc:  # one damaged volume must not hide the others from `ls`
        header, status = {}, f"damaged: {exc}"
    usage = root.usage(name)
    paths = sorted(
        e.mountpoint
        for e in mounts.volfs_mounts()
        if e.source == name and e.mountpoint != str(staging)
    )
    if status is None:
        status = ("mounted" if paths else "busy") if root.is_served(name) else "unmounted"
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(header.get("created_ns", 0) / 1e9))
    return {
        "name": name,
        "size": header.get("size", 0),
        "used": usage.get("used", 0),
        "inodes": usage.get("inodes", 0),
        "inodes_limit": header.get("inodes", 0),
        "mounts": paths,
        "read_only": sorted(str(p) for p in read_only),
        "status": status,
        "created": created,
        "labels": header.get("labels", {}),
        "store": str(root.volume_path(name)),
    }
