"""The store root: where volumes live, their format versions, and who may serve them.

Layout::

    ROOT/FORMAT                  "volfs-store 1"
    ROOT/volumes/NAME/volume     one frame: {"kind", "format", "name", "id", "created_ns", ...}
    ROOT/volumes/NAME/lock       flock held by the one process serving the volume
    ROOT/volumes/NAME/checkpoint the state as of a log position (journal.py)
    ROOT/volumes/NAME/seg-*.log  the log (log.py)
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import time
import uuid
from pathlib import Path

from volfs.errors import StoreError
from volfs.store import frame
from volfs.store.volume import FORMAT, Volume

STORE_FORMAT = 1
VOLUME_KIND = "volfs-volume"
DEFAULT_SEGMENT_SIZE = 64 * 1024 * 1024
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def default_root() -> Path:
    """``$VOLFS_ROOT``, else /var/lib/volfs for root, else ``$XDG_DATA_HOME/volfs``."""
    if env := os.environ.get("VOLFS_ROOT"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/volfs")
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data_home) / "volfs"


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise StoreError(
            f"invalid volume name {name[:80]!r}: use 1-63 characters of a-z, 0-9, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return name


class StoreRoot:
    """A store root directory, checked for existence, permissions and format on creation."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.mkdir(mode=0o700, exist_ok=True)
            (self.path / "volumes").mkdir(mode=0o700, exist_ok=True)
        except FileNotFoundError:
            raise StoreError(
                f"store root {self.path} does not exist and its parent is missing: "
                "create it or set VOLFS_ROOT"
            ) from None
        except PermissionError:
            raise StoreError(
                f"store root {self.path} is not writable by this user: "
                "run as its owner or set VOLFS_ROOT to a writable directory"
            ) from None
        except OSError as exc:
            raise StoreError(f"store root {self.path} cannot be used: {exc.strerror}") from None
        if not os.access(self.path, os.W_OK) or not os.access(self.path / "volumes", os.W_OK):
            raise StoreError(
                f"store root {self.path} is not writable by this user: "
                "run as its owner or set VOLFS_ROOT to a writable directory"
            )
        self._check_format()

    def _check_format(self) -> None:
        marker = self.path / "FORMAT"
        try:
            text = marker.read_text()
        except FileNotFoundError:
            tmp = self.path / "FORMAT.tmp"
            tmp.write_text(f"volfs-store {STORE_FORMAT}\n")
            tmp.rename(marker)
            return
        except OSError as exc:
            raise StoreError(
                f"store root {self.path}: cannot read FORMAT: {exc.strerror}"
            ) from None
        kind, _, version = text.strip().partition(" ")
        if kind != "volfs-store" or not version.isdigit():
            raise StoreError(f"{self.path} is not a volfs store root (FORMAT says {text[:40]!r})")
        if int(version) > STORE_FORMAT:
            raise StoreError(
                f"store root {self.path} has format {version}, newer than this volfs "
                f"understands ({STORE_FORMAT}): upgrade volfs"
            )

    def volume_path(self, name: str) -> Path:
        return self.path / "volumes" / check_name(name)

    def names(self) -> list[str]:
        return sorted(
            p.name for p in (self.path / "volumes").iterdir() if NAME_PATTERN.fullmatch(p.name)
        )

    def open_volume(
        self, name: str, create: bool = True, segment_size: int = DEFAULT_SEGMENT_SIZE
    ) -> Volume:
        """Lock and load volume *name*, creating it first if it is new and *create* is set.

        *segment_size* applies to a volume created now; an existing one keeps its own.
        The caller owns the returned volume until ``close()``; the lock goes with the volume's
        file descriptors, so it is released when the process ends, however it ends.
        """
        path = self.volume_path(name)
        try:
            path.mkdir(mode=0o700, exist_ok=create)
        except FileExistsError:
            pass
        except FileNotFoundError:
            raise StoreError(f"volume {name} does not exist") from None
        if not path.is_dir():
            raise StoreError(f"volume {name} does not exist")
        dir_fd = os.open(path, _DIR_FLAGS)
        lock_fd = -1
        try:
            lock_fd = self._lock(name, dir_fd)
            header = self._volume_header(name, dir_fd, segment_size)
            volume = Volume(name, dir_fd, lock_fd, header["id"], header["segment_size"])
            volume.load(time.time_ns())
        except BaseException:
            os.close(dir_fd)
            if lock_fd >= 0:
                os.close(lock_fd)
            raise
        return volume

    @staticmethod
    def _lock(name: str, dir_fd: int) -> int:
        """Take the volume's lock; it lasts until the returned fd closes or the process ends."""
        fd = os.open(
            "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreError(
                f"volume {name} is already being served (pid {holder}): "
                "unmount it there first, or add a mount point of that mount"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    @staticmethod
    def _volume_header(name: str, dir_fd: int, segment_size: int) -> dict:
        try:
            fd = os.open("volume", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except FileNotFoundError:
            header = {
                "kind": VOLUME_KIND,
                "format": FORMAT,
                "name": name,
                "id": str(uuid.uuid4()),
                "created_ns": time.time_ns(),
                "segment_size": segment_size,
                "block_size": frame.BLOCK_SIZE,
            }
            _write_durably(dir_fd, "volume", b"".join(frame.encode(header)))
            return header
        with os.fdopen(fd, "rb") as src:
            raw = src.read(1 << 16)
        try:
            meta_len, _, _ = frame.decode_header(raw)
            header = frame.decode_meta(
                raw[: frame.HEADER.size], raw[frame.HEADER.size :][:meta_len]
            )
        except frame.FrameError as exc:
            raise StoreError(f"volume {name}: its header file is damaged ({exc})") from None
        if not isinstance(header, dict) or header.get("kind") != VOLUME_KIND:
            raise StoreError(f"volume {name}: its header file is not a volfs volume header")
        if header.get("format", 0) > FORMAT:
            raise StoreError(
                f"volume {name} has format {header['format']}, newer than this volfs "
                f"understands ({FORMAT}): upgrade volfs"
            )
        if header.get("block_size") != frame.BLOCK_SIZE:
            raise StoreError(f"volume {name}: unsupported block size {header.get('block_size')}")
        return header


def _write_durably(dir_fd: int, name: str, data: bytes) -> None:
    tmp = name + ".tmp"
    fd = os.open(
        tmp,
        os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=dir_fd,
    )
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)
