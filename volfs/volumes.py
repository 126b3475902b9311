"""Rules for volumes and mount points that the CLI and the daemon share.

Kept apart from the daemon so that the CLI can use them without loading trio.
"""

from __future__ import annotations

import logging
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
        "mounts": paths,
        "read_only": sorted(str(p) for p in read_only),
        "status": status,
        "created": created,
        "labels": header.get("labels", {}),
        "store": str(root.volume_path(name)),
    }
