"""The volume catalog: what a volume's options mean and what `ls`/`inspect` show of it, shared
by the CLI and the daemon.

Kept apart from the daemon so that the CLI can use them without loading trio.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from volfs import mounts
from volfs.errors import VolfsError
from volfs.store import headers, history, snapshots
from volfs.store.headers import MAX_ID, root_attrs
from volfs.store.root import StoreRoot
from volfs.store.snapshots import parse_name

log = logging.getLogger(__name__)

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
#: A whole number of bytes, or of KiB, MiB, GiB or TiB: the only spellings the README lists.
#: No fractions, no lower case and no B/iB: "10g" or "1.5G" would be guesses at what was meant
#: (and a config that says "10GB" reads as decimal gigabytes to many people).
_SIZE = re.compile(r"([0-9]+)([KMGT]?)")
#: Largest size a volume may be given: sizes are stored as unsigned 64-bit numbers.
MAX_SIZE = 1 << 62
_ACCEPTED = "a whole number of bytes, or one followed by K, M, G or T (powers of 1024): 512M, 10G"


#: The engine of the host's own store, which every host has (`volfs.engines`); not a name for
#: an ``[engines.NAME]`` table of the config.
LOCAL_ENGINE = "local"


def parse_size(text: str | int) -> int:
    """Bytes in "4096", "512M", "10G", "1T" (binary units, upper case); an int is taken as is."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        shown = str(text)[:40]
        match = _SIZE.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            hint = ""
            if isinstance(text, str) and _SIZE.fullmatch(text.upper()):
                hint = f" (units are upper case: {text.upper()})"
            raise VolfsError(f"invalid size {shown!r}: use {_ACCEPTED}{hint}")
        # More digits than any allowed size has is too large, not parsed (int() of thousands
        # of digits is slow, and refused past 4300).
        value = int(match[1]) * _UNITS[match[2]] if len(match[1]) <= 30 else MAX_SIZE + 1
        text = shown
    if value <= 0:
        raise VolfsError(f"invalid size {str(text)[:40]!r}: use {_ACCEPTED}")
    if value > MAX_SIZE:
        raise VolfsError(f"size {str(text)[:40]!r} is too large: at most {MAX_SIZE >> 40}T")
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


def parse_uid(value: str | int) -> int:
    """The owner of a new volume's root: a user's number, 0 to 2**32-2 (digits or an int)."""
    return _parse_id(value, "uid", "id -u")


def parse_gid(value: str | int) -> int:
    """The group of a new volume's root: a group's number, 0 to 2**32-2 (digits or an int)."""
    return _parse_id(value, "gid", "id -g")


def _parse_id(value: str | int, what: str, command: str) -> int:
    # Numbers only: a name means the host's user of that name, and a container's user of the
    # same name often has another number (www-data is 33 in Debian's images, 82 in Alpine's).
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raw = str(value).strip()
        number = int(raw) if raw.isdigit() and raw.isascii() and len(raw) <= 10 else -1
        named = isinstance(value, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", raw[:40])
        if number < 0 and named:
            raise VolfsError(
                f"invalid {what} {raw[:40]!r}: give the number, not the name "
                f"(`{command} {raw[:40]}` prints it)"
            )
    if not 0 <= number <= MAX_ID:
        raise VolfsError(
            f"invalid {what} {str(value)[:40]!r}: use a whole number from 0 to {MAX_ID}"
        )
    return number


def parse_mode(value: str | int) -> int:
    """The permission bits of a new volume's root: octal digits ("0755", "755", "2775"), or an
    int taken as is; only the bits of 0o7777 (permissions, setuid, setgid, sticky)."""
    if isinstance(value, int) and not isinstance(value, bool):
        bits = value
    else:
        raw = str(value).strip()
        bits = int(raw, 8) if re.fullmatch(r"[0-7]{1,12}", raw) else -1
    if not 0 <= bits <= 0o7777:
        shown = oct(value) if isinstance(value, int) else repr(str(value)[:40])
        raise VolfsError(
            f"invalid mode {shown}: use octal digits as chmod takes them, at most 7777 "
            "(permissions, setuid, setgid, sticky): 0755, 0750, 2775"
        )
    return bits


def parse_labels(value: object) -> dict[str, str]:
    """Labels from ``KEY=VALUE`` strings (``--label``, repeated) or a map of strings (a request,
    a config table)."""
    if isinstance(value, list):
        labels = {}
        for item in value:
            key, sep, text = str(item).partition("=")
            if not isinstance(item, str) or not sep or not key:
                raise VolfsError(f"invalid label {str(item)[:80]!r}: use KEY=VALUE")
            labels[key] = text
        return labels
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise VolfsError("labels must be KEY=VALUE strings (in a config file: a table of strings)")
    return dict(value)


def created_at(header: dict[str, Any]) -> str:
    """When the volume of *header* was created, as `ls` shows it: RFC 3339, UTC, seconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(header.get("created_ns", 0) / 1e9))


def check_limits_match(name: str, header: dict[str, Any], size: int, inodes: int) -> None:
    """Refuse a mount that asks existing volume *name* (its *header*) for other limits than it
    has (0: none asked)."""
    current = header.get("size", 0)
    if size and current != size:
        raise VolfsError(
            f"volume {name} exists with {_limit(current, 'size')}: mount it without "
            f"--size, or change it with `volfsd resize {name} SIZE`"
        )
    if inodes and header.get("inodes", 0) != inodes:
        raise VolfsError(
            f"volume {name} exists with {_limit(header.get('inodes', 0), 'inode')}: "
            f"mount it without --inodes, or `volfsd resize {name} SIZE --inodes N`"
        )


def _limit(value: int, what: str) -> str:
    return f"{what} limit {value}" if value else f"no {what} limit"


def describe(
    root: StoreRoot,
    name: str,
    status: str | None = None,
    staging: Path | None = None,
    read_only: Iterable[Path] = (),
    device: str | None = None,
) -> dict[str, Any]:
    """What `ls` and `inspect` show of volume *name*.

    *status*, *staging*, *read_only* and *device* (the "major:minor" of the FUSE mount serving
    the volume) come from the daemon when it serves the volume; without them the status is read
    off the volume's lock and the device off ``volumes/NAME/device``.  Mounts are this volume's
    if they are of its device; with no device known, those of a volfs mount named like it,
    and only while the volume is served: another store's volume of the same name (or a dead
    mount of this one) is not this volume's.
    """
    # One damaged volume must not hide the others from `ls`: what is wrong with it is its
    # status, and the rest of its row shows what could be read.
    problems: list[str] = []
    try:
        header = root.header(name)
    except VolfsError as exc:
        header = {}
        problems.append(str(exc))
    try:
        served = root.is_served(name)
    except VolfsError as exc:  # its lock file is a link or not a file
        served = False
        problems.append(str(exc))
    usage = root.usage(name)
    if device is None and served:
        device = root.served_device(name)
    if device is not None:
        ours = [e for e in mounts.volfs_mounts() if e.device == device]
    elif served:
        ours = [e for e in mounts.volfs_mounts() if e.source == name]
    else:
        ours = []
    ours = [e for e in ours if e.mountpoint != str(staging)]
    paths = sorted(e.mountpoint for e in ours)
    # Read-only as the daemon made them, or as the mount table says (per-mount options).
    ro_paths = {str(p) for p in read_only}
    ro_paths |= {e.mountpoint for e in ours if "ro" in e.options.split(",")}
    if problems:
        status = "damaged: " + "; ".join(problems)
    elif status is None:
        status = ("mounted" if paths else "busy") if served else "unmounted"
    # A header that cannot be read says nothing of the root: no guessed default shown for it.
    uid, gid, mode = root_attrs(header) if header else (None, None, None)
    created = created_at(header)
    return {
        "name": name,
        "engine": LOCAL_ENGINE,
        "size": header.get("size", 0),
        "used": usage.get("used", 0),
        "inodes": usage.get("inodes", 0),
        "inodes_limit": header.get("inodes", 0),
        "mounts": paths,
        "read_only": sorted(ro_paths),
        "status": status,
        "created": created,
        "labels": header.get("labels", {}),
        # Of the root directory as the volume was created: chown and chmod of the mounted
        # root since are the volume's contents, which describing it must not load or mount.
        "uid": uid,
        "gid": gid,
        "mode": None if mode is None else f"{mode:04o}",
        "store": str(root.volume_path(name)),
        **_history_of(root, name, header),
        **health(root, name),
    }


def health(root: StoreRoot, name: str) -> dict[str, Any]:
    """What an operator watches of volume *name* besides its use: its last scrub (None:
    never scrubbed), the garbage ratio of its log (dead bytes over the log's bytes, by the
    usage file's bytes in use per segment; None when that is not known), and the free
    space of the disk under the store."""
    scrub: dict[str, Any] | None = None
    garbage: float | None = None
    found = headers.read_scrubbed(root.path, name)
    if found is not None:
        scrub = {**found, "at": created_at({"created_ns": found["at_ns"]})}
    with contextlib.suppress(VolfsError, OSError):
        fd = root.open_dir(name)
        try:
            live = headers.read_live(fd)
            total: int = sum(st.st_size for _, st in snapshots.segments(fd))
            if live is not None and total:
                in_use: int = sum(live.values())
                garbage = round(max(0, total - in_use) / total, 3)
        finally:
            os.close(fd)
    disk = os.statvfs(root.path)
    return {"last_scrub": scrub, "garbage_ratio": garbage,
            "disk_free": disk.f_bavail * disk.f_frsize}  # fmt: skip


def _history_of(root: StoreRoot, name: str, header: dict[str, Any]) -> dict[str, Any]:
    """A volume's snapshots (how many, the disk bytes only they hold) and the snapshot it
    was cloned from (None: not a clone)."""
    origin = header.get("origin")
    made_from = (
        f"{origin.get('volume')}@{origin.get('snapshot')}" if isinstance(origin, dict) else None
    )
    try:
        count, held = history.count(root, name), history.snapshot_bytes(root, name)
    except (VolfsError, OSError):
        count, held = 0, 0
    return {"snapshots": count, "snapshot_bytes": held, "origin": made_from}


def with_health(root: StoreRoot, name: str, row: dict[str, Any]) -> dict[str, Any]:
    """*row* (of `status`) with volume *name*'s `health`; a snapshot's row as it is."""
    return row if "@" in name else {**row, **health(root, name)}


def describe_snapshot(
    root: StoreRoot,
    label: str,
    status: str | None = None,
    staging: Path | None = None,
    read_only: Iterable[Path] = (),
    device: str | None = None,
) -> dict[str, Any]:
    """What `ls --snapshots` and `inspect` show of snapshot *label* (NAME@SNAP): created, the
    volume's used bytes and inodes then, the bytes only it keeps alive (``held``), and its
    mounts (those of *device* if the daemon serves it, else volfs mounts named *label*)."""
    name, snap = parse_name(label)
    (row,) = history.describe(root, name, only=snap)
    found = [
        e for e in mounts.volfs_mounts() if (e.device == device if device else e.source == label)
    ]
    paths = sorted(e.mountpoint for e in found if e.mountpoint != str(staging))
    return {
        **row,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row.get("created_ns", 0) / 1e9)),
        "mounts": paths,
        "read_only": paths,  # every mount of a snapshot is read-only
        "status": status or ("mounted" if paths else "unmounted"),
        "store": str(history.snapshot_path(root, name, snap)),
    }
