"""The store root: where volumes live, their format versions, and who may serve them.

Layout::

    ROOT/FORMAT                  "volfs-store 1"
    ROOT/volumes/NAME/volume     one frame: {"kind", "format", "name", "id", "created_ns",
                                 "segment_size", "block_size", "size" (quota, 0: none), "labels",
                                 "inodes" (inode limit, 0 or absent: none)}
    ROOT/volumes/NAME/usage      one frame: {"used", "inodes"}, rewritten by the server
    ROOT/volumes/NAME/lock       flock held by the one process serving the volume
    ROOT/volumes/NAME/checkpoint the state as of a log position (journal.py)
    ROOT/volumes/NAME/seg-*.log  the log (log.py)
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import BinaryIO

import msgpack

from volfs.errors import StoreError
from volfs.store import frame, journal, pidlock
from volfs.store.volume import FORMAT, USAGE_FILE, Volume, segment_size_for

STORE_FORMAT = 1
VOLUME_KIND = "volfs-volume"
DEFAULT_SEGMENT_SIZE = 64 * 1024 * 1024
#: Most bytes a volume's labels may take (packed): the header file is read in one 64 KiB piece.
MAX_LABELS = 32 * 1024
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
            fd = os.open(self.path, _DIR_FLAGS)
            try:  # synced with the directory, so "volumes/" and FORMAT outlive a power cut
                journal.write_durably(fd, "FORMAT", f"volfs-store {STORE_FORMAT}\n".encode())
            finally:
                os.close(fd)
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

    def log_path(self, name: str) -> Path:
        """The log file *name* (``NAME.log`` of a volume's worker, ``volfsd.log``)."""
        return self.path / "logs" / name

    def open_log(self, name: str) -> BinaryIO:
        """Open log file *name* for appending: private to the store's owner, like the store."""
        (self.path / "logs").mkdir(mode=0o700, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.fdopen(os.open(self.log_path(name), flags, 0o600), "ab")

    def volume_path(self, name: str) -> Path:
        return self.path / "volumes" / check_name(name)

    def names(self) -> list[str]:
        """Names of the volumes in the store (directories with a header file)."""
        return sorted(
            p.name
            for p in (self.path / "volumes").iterdir()
            if NAME_PATTERN.fullmatch(p.name) and (p / "volume").is_file()
        )

    def exists(self, name: str) -> bool:
        return (self.volume_path(name) / "volume").is_file()

    def create_volume(
        self,
        name: str,
        size: int = 0,
        labels: dict[str, str] | None = None,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        inodes: int = 0,
    ) -> dict:
        """Create volume *name* if it is new; return its header.

        Creating an existing volume with the same options changes nothing; with other options
        it is refused, as ``docker volume create`` does.  A volume with a *size* gets smaller
        segments (`segment_size_for`), on which the bound of its disk use depends.
        """
        labels = dict(labels or {})
        if len(msgpack.packb(labels)) > MAX_LABELS:
            raise StoreError(f"labels of volume {name} are too large: at most 32 KiB in all")
        path = self.volume_path(name)
        try:
            path.mkdir(mode=0o700)
            made = True
            _fsync_dir(path.parent)  # the new volume's name must survive a power cut too
        except FileExistsError:
            made = False
        dir_fd = os.open(path, _DIR_FLAGS)
        try:
            try:
                header = self._read_header(name, dir_fd)
            except FileNotFoundError:
                header = {
                    "kind": VOLUME_KIND,
                    "format": FORMAT,
                    "name": name,
                    "id": str(uuid.uuid4()),
                    "created_ns": time.time_ns(),
                    "segment_size": min(segment_size, segment_size_for(size)),
                    "block_size": frame.BLOCK_SIZE,
                    "size": size,
                    "labels": labels,
                    "inodes": inodes,
                }
                try:
                    journal.write_durably(dir_fd, "volume", b"".join(frame.encode(header)))
                except BaseException:
                    if made:  # leave no half-made volume that `ls` would trip over
                        shutil.rmtree(path, ignore_errors=True)
                    raise
                return header
        finally:
            os.close(dir_fd)
        if (
            (size and header.get("size", 0) != size)
            or (labels and header.get("labels") != labels)
            or (inodes and header.get("inodes", 0) != inodes)
        ):
            raise StoreError(
                f"volume {name} already exists with other options "
                f"(size {header.get('size', 0)}, inodes {header.get('inodes', 0)}, "
                f"labels {header.get('labels', {})})"
            )
        return header

    def header(self, name: str) -> dict:
        """The header of volume *name* (no lock needed: it is replaced atomically)."""
        dir_fd = self._open_dir(name)
        try:
            return self._read_header(name, dir_fd)
        except FileNotFoundError:
            raise StoreError(f"volume {name} does not exist") from None
        finally:
            os.close(dir_fd)

    def _open_dir(self, name: str) -> int:
        try:
            return os.open(self.volume_path(name), _DIR_FLAGS)
        except FileNotFoundError:
            raise StoreError(f"volume {name} does not exist") from None

    def usage(self, name: str) -> dict:
        """The last usage figures the volume's server wrote: {"used": bytes, "inodes": n}."""
        try:
            raw = (self.volume_path(name) / USAGE_FILE).read_bytes()
            meta_len, _, _ = frame.decode_header(raw)
            usage = frame.decode_meta(raw[: frame.HEADER.size], raw[frame.HEADER.size :][:meta_len])
            return usage if isinstance(usage, dict) else {}
        except (OSError, frame.FrameError):
            return {}

    def is_served(self, name: str) -> bool:
        """Whether a process holds the volume's lock right now."""
        return pidlock.is_held(self.volume_path(name) / "lock")

    def remove_volume(self, name: str) -> None:
        """Destroy volume *name* and its data; refused while it is served."""
        dir_fd = self._open_dir(name)
        try:
            lock_fd = self._lock(name, dir_fd)  # nobody may start serving it meanwhile
        finally:
            os.close(dir_fd)
        try:
            doomed = self.path / "volumes" / f".removing-{name}-{uuid.uuid4().hex[:8]}"
            os.rename(self.volume_path(name), doomed)
            shutil.rmtree(doomed)
        finally:
            os.close(lock_fd)

    def open_volume(
        self, name: str, create: bool = True, segment_size: int = DEFAULT_SEGMENT_SIZE
    ) -> Volume:
        """Lock and load volume *name*, creating it first if it is new and *create* is set.

        *segment_size* applies to a volume created now; an existing one keeps its own.
        The caller owns the returned volume until ``close()``; the lock goes with the volume's
        file descriptors, so it is released when the process ends, however it ends.
        """
        if create:
            self.create_volume(name, segment_size=segment_size)
        dir_fd = self._open_dir(name)
        lock_fd = -1
        try:
            lock_fd = self._lock(name, dir_fd)
            try:
                header = self._read_header(name, dir_fd)
            except FileNotFoundError:
                raise StoreError(f"volume {name} does not exist") from None
            volume = Volume(name, dir_fd, lock_fd, header["id"], header["segment_size"])
            volume.header = header
            volume.quota = header.get("size", 0)
            volume.inode_limit = header.get("inodes", 0)
            volume.load(time.time_ns())
        except BaseException:
            os.close(dir_fd)
            if lock_fd >= 0:
                os.close(lock_fd)
            raise
        return volume

    def resize(self, name: str, size: int | None = None, inodes: int | None = None) -> dict:
        """Give volume *name*, which must not be served, a new size and inode limit (None:
        keep; 0: none); return its new header.

        The volume is loaded (as a mount would) to know exactly what it holds: making it
        smaller than that is refused.
        """
        if self.is_served(name):
            raise StoreError(
                f"volume {name} is mounted: unmount it to resize it "
                "(a mounted volume cannot be resized yet)"
            )
        volume = self.open_volume(name, create=False)
        try:
            volume.set_limits(
                volume.quota if size is None else size,
                volume.inode_limit if inodes is None else inodes,
            )
            return dict(volume.header)
        finally:
            volume.close()

    @staticmethod
    def _lock(name: str, dir_fd: int) -> int:
        """Take the volume's lock; it lasts until the returned fd closes or the process ends."""
        try:
            return pidlock.take("lock", dir_fd)
        except pidlock.LockHeld as held:
            raise StoreError(
                f"volume {name} is already being served (pid {held.holder}): "
                "unmount it there first, or add a mount point of that mount"
            ) from None

    @staticmethod
    def _read_header(name: str, dir_fd: int) -> dict:
        """The volume's header; FileNotFoundError if it has none (not created yet)."""
        fd = os.open("volume", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
