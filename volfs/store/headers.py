"""The small files of a volume directory: its header (``volume``) and its usage figures.

Both are one frame each (`volfs.store.frame`) whose meta part is a map; ARCHITECTURE.md ("On-disk
format") lists their keys.  The header is written durably by whoever creates or resizes the
volume and checked here, once, so that nothing that uses it can trip on a field of the wrong
type; the usage file is advisory (what `volfsd ls` shows), rewritten by the server without a
sync, and anything wrong with it reads as no figures.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from volfs.errors import ErrorCode, StoreError
from volfs.store import frame
from volfs.store.records import FORMAT

HEADER_FILE = "volume"
#: Names of volumes (and of snapshots): what a directory of the store may be called.
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
VOLUME_KIND = "volfs-volume"
#: File in the volume directory with the figures `volfsd ls` shows for the volume.
USAGE_FILE = "usage"


def scrubbed_file(name: str) -> str:
    """The file in the store's ``logs/`` with what the last scrub of volume *name* found:
    {at_ns, verified, problems, damaged}, written by `volfsd scrub` (advisory)."""
    return f"{name}.scrubbed"


#: For the store's own small files: no links followed, and no hang on a FIFO planted there.
FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: The small files are read in one piece of this size.
_MAX_SMALL_FILE = 1 << 16
#: The root directory's permission bits when the header does not give them.
DEFAULT_ROOT_MODE = 0o755
#: Largest uid or gid a volume's root may have: 2**32 - 1 is (uid_t) -1, which chown(2) reads
#: as "leave unchanged".
MAX_ID = (1 << 32) - 2
#: The keys of the header's ``root``, each with its largest value.
_ROOT_LIMITS = {"uid": MAX_ID, "gid": MAX_ID, "mode": 0o7777}


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise StoreError(
            f"invalid volume name {name[:80]!r}: use 1-63 characters of a-z, 0-9, '_', '.', '-', "
            "starting with a letter or digit",
            ErrorCode.INVALID,
        )
    return name


def fd_path(fd: int) -> Path:
    """The path of the directory open at *fd*, for messages."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return Path(f"/proc/self/fd/{fd}")


def count(value: object) -> bool:
    """Whether *value* is a non-negative int (and not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def describe_mode(mode: int) -> str:
    """What a file of *mode* is, for messages."""
    for test, kind in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "a device node"


def one_frame(raw: bytes) -> object:
    meta_len, _, _ = frame.decode_header(raw)
    return frame.decode_meta(raw[: frame.HEADER.size], raw[frame.HEADER.size :][:meta_len])


def read_header(name: str, dir_fd: int) -> dict[str, Any]:
    """The header of volume *name*, whose directory is open at *dir_fd*; FileNotFoundError if
    it has none (not created yet), `StoreError` if it cannot be used."""
    path = fd_path(dir_fd) / HEADER_FILE
    try:
        fd = os.open(HEADER_FILE, os.O_RDONLY | FILE_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StoreError(
                f"volume {name}: its header {path} is a symbolic link: volfs follows no "
                "links in its store"
            ) from None
        raise StoreError(f"volume {name}: cannot read its header {path}: {exc.strerror}") from None
    header = read_kind(fd, f"volume {name}: its header", f"{path}", VOLUME_KIND)
    _check_header(name, header)
    return header


def read_kind(fd: int, what: str, path: str, kind: str) -> dict[str, Any]:
    """The map in the one-frame file open at *fd* (closed here), whose ``kind`` must be
    *kind*; *what* and *path* name it in errors ("volume v: its header", its path)."""
    with os.fdopen(fd, "rb") as src:
        mode = os.fstat(src.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise StoreError(f"{what} {path} is {describe_mode(mode)}")
        raw = src.read(_MAX_SMALL_FILE)
    try:
        found = one_frame(raw)
    except frame.FrameError as exc:
        raise StoreError(f"{what} file is damaged ({exc})", ErrorCode.DAMAGED) from None
    if not isinstance(found, dict) or found.get("kind") != kind:
        raise StoreError(f"{what} file is not a {kind} header")
    return found


def _check_header(name: str, header: dict[str, Any]) -> None:
    if not count(header.get("format", 0)):
        raise StoreError(
            f"volume {name}: its header file is damaged (bad format)", ErrorCode.DAMAGED
        )
    if header.get("format", 0) > FORMAT:
        raise StoreError(
            f"volume {name} has format {header['format']}, newer than this volfs "
            f"understands ({FORMAT}): upgrade volfs"
        )
    if header.get("block_size") != frame.BLOCK_SIZE:
        raise StoreError(f"volume {name}: unsupported block size {header.get('block_size')}")
    labels = header.get("labels", {})
    checks = {
        "id": isinstance(header.get("id"), str),
        "created_ns": count(header.get("created_ns", 0)),
        "segment_size": count(header.get("segment_size")) and header["segment_size"] > 0,
        "size": count(header.get("size", 0)),
        "labels": isinstance(labels, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()),
    }
    checks["root"] = _root_fits(header.get("root", {}))
    bad = [key for key, ok in checks.items() if not ok]
    if bad:
        raise StoreError(
            f"volume {name}: its header file is damaged (bad {', '.join(bad)})", ErrorCode.DAMAGED
        )


def root_attrs(header: Mapping[str, Any]) -> tuple[int, int, int]:
    """The uid, gid and permission bits the root directory of the volume with *header* gets
    when it is first made (its first mount; a snapshot of a volume never mounted).

    From the header's ``root`` key; what it leaves out (volumes made before the key) is what
    volfs always gave the root: the serving process's uid and gid (root's, for the daemon)
    and 0755.
    """
    root = header.get("root", {})
    return (
        root.get("uid", os.getuid()),
        root.get("gid", os.getgid()),
        root.get("mode", DEFAULT_ROOT_MODE),
    )


def _root_fits(root: object) -> bool:
    """Whether *root* is a ``root`` key of a header: a map of whole numbers in range."""
    return isinstance(root, dict) and all(
        count(root.get(key, 0)) and root.get(key, 0) <= most for key, most in _ROOT_LIMITS.items()
    )


def root_key(uid: int | None, gid: int | None, mode: int | None) -> dict[str, int]:
    """The header's ``root`` for a new volume whose root gets *uid*, *gid* and permission bits
    *mode* (None: `root_attrs`'s default); `StoreError` (invalid) if one is out of range."""
    given = {k: v for k, v in zip(_ROOT_LIMITS, (uid, gid, mode), strict=True) if v is not None}
    root = dict(zip(_ROOT_LIMITS, root_attrs({"root": given}), strict=True))
    if not _root_fits(root):
        raise StoreError(
            f"invalid owner or mode of a volume's root: uid {root['uid']}, gid {root['gid']}, "
            f"mode {root['mode']:#o} (uid and gid 0 to {MAX_ID}, mode at most 0o7777)",
            ErrorCode.INVALID,
        )
    return root


def check_alike(name: str, header: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Refuse to create volume *name* again with options *wanted* (``size``, ``labels``,
    ``inodes``, ``uid``, ``gid``, ``mode``) that differ from those of its *header*.

    An option not given (None, and 0 or empty for the limits and labels, whose defaults
    those are) is no difference: ``create`` of an existing volume without it is a no-op.
    """
    uid, gid, mode = root_attrs(header)
    current = {
        "size": header.get("size", 0),
        "labels": header.get("labels", {}),
        "inodes": header.get("inodes", 0),
        "uid": uid,
        "gid": gid,
        "mode": mode,
    }
    ids = ("uid", "gid", "mode")  # 0 is a uid, gid or mode one may ask for
    differ = [
        key
        for key, value in wanted.items()
        if (value is not None if key in ids else bool(value)) and current[key] != value
    ]
    if differ:
        shown = ", ".join(
            f"{key} {current[key]:04o}" if key == "mode" else f"{key} {current[key]}"
            for key in current
        )
        raise StoreError(
            f"volume {name} already exists with other options ({shown})", ErrorCode.EXISTS
        )


def _usage_frame(dir_fd: int) -> dict[Any, Any]:
    try:
        fd = os.open(USAGE_FILE, os.O_RDONLY | FILE_FLAGS, dir_fd=dir_fd)
        with os.fdopen(fd, "rb") as src:
            if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
                return {}
            raw = src.read(_MAX_SMALL_FILE)
        usage = one_frame(raw)
    except (OSError, frame.FrameError):
        return {}
    return usage if isinstance(usage, dict) else {}


def read_usage(dir_fd: int) -> dict[str, int]:
    """The usage figures in the volume directory open at *dir_fd*; {} if anything is wrong."""
    usage = _usage_frame(dir_fd)
    return {k: v for k, v in usage.items() if k in ("used", "inodes") and count(v)}


def read_live(dir_fd: int) -> dict[int, int] | None:
    """The bytes of each segment the volume's files used when its server last wrote the usage
    file (`live_map`); None if it gave none."""
    return live_map(_usage_frame(dir_fd).get("live"))


#: Most segments a ``live`` map lists: the small files it is kept in are read in 64 KiB.
MAX_LIVE_SEGMENTS = 4096


def live_map(value: object) -> dict[int, int] | None:
    """*value* if it is a map of segment numbers to bytes (the usage file's and a snapshot
    header's ``live``), else None."""
    if isinstance(value, dict) and all(count(k) and count(v) for k, v in value.items()):
        return dict(value)
    return None


def live_of(live: Mapping[int, int]) -> dict[int, int] | None:
    """What a usage file or snapshot header keeps of *live* (segment -> bytes in use): the
    segments in use, or None where there are too many for its small file."""
    used = {seg: n for seg, n in live.items() if n}
    return used if len(used) <= MAX_LIVE_SEGMENTS else None


def write_usage(dir_fd: int, figures: Mapping[str, object]) -> None:
    """Replace the usage file by *figures* (atomically; no fsync: advisory)."""
    write_small(dir_fd, USAGE_FILE, figures)


def _logs_dir(root: Path) -> int:
    return os.open(Path(root) / "logs", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def note_scrubbed(root: Path, name: str, figures: Mapping[str, object]) -> None:
    """Keep what a scrub of volume *name* of store *root* found (`scrubbed_file`)."""
    logs_fd = _logs_dir(root)
    try:
        write_small(logs_fd, scrubbed_file(name), figures)
    finally:
        os.close(logs_fd)


def read_scrubbed(root: Path, name: str) -> dict[str, Any] | None:
    """What the last scrub of volume *name* of store *root* found (`scrubbed_file`); None if
    none is known."""
    try:
        logs_fd = _logs_dir(root)
    except OSError:
        return None
    try:
        fd = os.open(scrubbed_file(name), os.O_RDONLY | FILE_FLAGS, dir_fd=logs_fd)
        with os.fdopen(fd, "rb") as src:
            if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
                return None
            found = one_frame(src.read(_MAX_SMALL_FILE))
    except (OSError, frame.FrameError):
        return None
    finally:
        os.close(logs_fd)
    keys = ("at_ns", "verified", "problems")
    if not isinstance(found, dict) or not all(count(found.get(k)) for k in keys):
        return None
    kept = {k: found[k] for k in (*keys, "damaged") if k in found}
    kept["found_total"] = found.get("found_total") if count(found.get("found_total")) else 0
    return kept


def write_small(dir_fd: int, name: str, figures: Mapping[str, object]) -> None:
    """Replace small file *name* by one frame of *figures* (atomically; no fsync: advisory)."""
    tmp = name + ".tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
    try:
        os.write(fd, b"".join(frame.encode(figures)))
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
