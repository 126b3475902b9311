"""The store root: where volumes live, their format versions, and who may serve them.

Layout::

    ROOT/FORMAT                  "volfs-store 1"
    ROOT/volumes/NAME/volume     one frame: {"kind", "format", "name", "id", "created_ns",
                                 "segment_size", "block_size", "size" (quota, 0: none), "labels",
                                 "inodes" (inode limit, 0 or absent: none), "root" ({"uid",
                                 "gid", "mode"} of the root directory; absent: see
                                 `headers.root_attrs`)}
    ROOT/volumes/NAME/usage      one frame: {"used", "inodes"}, rewritten by the server
    ROOT/volumes/NAME/lock       flock held by the one process serving the volume
    ROOT/volumes/NAME/device     "major:minor\\n" of its FUSE mount, by its server (while locked)
    ROOT/volumes/NAME/checkpoint the state as of a log position (journal.py)
    ROOT/volumes/NAME/seg-*.log  the log (log.py)
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import stat
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO

import msgpack

from volfs.errors import ErrorCode, StoreError
from volfs.store import frame, headers, journal, pidlock, snapshots
from volfs.store.headers import FILE_FLAGS as _FILE_FLAGS
from volfs.store.headers import NAME_PATTERN, VOLUME_KIND, check_name
from volfs.store.headers import describe_mode as _kind
from volfs.store.records import FORMAT
from volfs.store.space import segment_size_for
from volfs.store.volume import Volume

logger = logging.getLogger(__name__)

STORE_FORMAT = 1
DEFAULT_SEGMENT_SIZE = 64 * 1024 * 1024
#: Most bytes a volume's labels may take (packed): the header file is read in one 64 KiB piece.
MAX_LABELS = 32 * 1024
#: In a volume directory: the device of the FUSE mount serving it (`served_device`).
DEVICE_FILE = "device"
_DEVICE = re.compile(r"([0-9]{1,10}:[0-9]{1,10})\n?")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def default_root() -> Path:
    """``$VOLFS_ROOT``, else /var/lib/volfs for root, else ``$XDG_DATA_HOME/volfs``."""
    if env := os.environ.get("VOLFS_ROOT"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/volfs")
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data_home) / "volfs"


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
                "run as its owner or set VOLFS_ROOT to a writable directory",
                ErrorCode.PERMISSION,
            ) from None
        except OSError as exc:
            raise StoreError(f"store root {self.path} cannot be used: {exc.strerror}") from None
        if not os.access(self.path, os.W_OK) or not os.access(self.path / "volumes", os.W_OK):
            raise StoreError(
                f"store root {self.path} is not writable by this user: "
                "run as its owner or set VOLFS_ROOT to a writable directory",
                ErrorCode.PERMISSION,
            )
        # The root itself may be reached through a link (/var/lib/volfs -> /data/volfs), but
        # nothing inside it: a link there would lead the store's files out of it.
        for part in ("volumes", "logs"):
            _check_real_dir(self.path / part, f"store root {self.path}: {part}/")
        self._check_format()
        self._make_private()

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

    def _make_private(self) -> None:
        """Give the root, volumes/ and each volume directory in it, logs/ and each log file
        back the modes volfs made them with (0700, 0600), with a warning naming each.

        Repaired rather than refused: volfs made them private, so other modes were set from
        outside (a chmod -R, a copy or restore that kept no modes), and there is only one
        right answer.  Refusing would turn a mode bit into an outage (under systemd no volume
        would mount at boot, and every container bound to one would fail) while leaving the
        files readable until someone acted; repairing closes the leak at once, and the warning
        says that it was open.  The files in a volume directory are repaired when the volume
        is opened (`open_volume`): listing a store must not stat every segment of every volume.
        """
        root_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # may be a link
        try:
            _repair_mode(root_fd, self.path)
            for part in ("volumes", "logs"):
                try:
                    fd = os.open(part, _DIR_FLAGS, dir_fd=root_fd)
                except FileNotFoundError:
                    continue
                try:
                    _repair_mode(fd, self.path / part)
                    # Volume directories and log files; links and other strangers are left
                    # alone (`names` and `open_log` refuse them).
                    ours = "dir" if part == "volumes" else "file"
                    with os.scandir(fd) as entries:
                        for entry in entries:
                            kind = "dir" if entry.is_dir(follow_symlinks=False) else "file"
                            if kind == ours:
                                _repair_entry(fd, entry.name, self.path / part / entry.name)
                finally:
                    os.close(fd)
            _repair_entry(root_fd, "FORMAT", self.path / "FORMAT")
        finally:
            os.close(root_fd)

    def log_path(self, name: str) -> Path:
        """The log file *name* (``NAME.log`` of a volume's worker, ``volfsd.log``)."""
        return self.path / "logs" / name

    def open_log(self, name: str) -> BinaryIO:
        """Open log file *name* for appending: private to the store's owner, like the store."""
        return open_log(self.path, name)

    def volume_path(self, name: str) -> Path:
        return self.path / "volumes" / check_name(name)

    def names(self) -> list[str]:
        """Names of the volumes in the store: directories with a header file.

        Anything else under a volume's name (a symbolic link, a file, a directory without a
        header) is left out with a warning naming it, so that it hides only itself.  A volume
        whose header is there but bad is listed: `ls` shows it as damaged.
        """
        found = []
        with os.scandir(self.path / "volumes") as entries:
            for entry in entries:
                if not NAME_PATTERN.fullmatch(entry.name):
                    continue  # volfs's own (.removing-NAME-...), never a volume
                problem = self.entry_problem(entry.name)
                if problem is None:
                    found.append(entry.name)
                else:
                    logger.warning("store %s: ignoring %s: %s", self.path, entry.path, problem)
        return sorted(found)

    def entry_problem(self, name: str) -> str | None:
        """Why volumes/NAME is not a volume (None: it is one, or nothing is there)."""
        path = self.volume_path(name)
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(mode):
            return "a symbolic link, not a volume directory (volfs follows no links in its store)"
        if not stat.S_ISDIR(mode):
            return f"{_kind(mode)}, not a volume directory"
        if not os.path.lexists(path / headers.HEADER_FILE):
            return (
                "a directory without a volume header (an interrupted create leaves one: "
                f"'volfsd create {name}' completes it)"
            )
        return None

    def exists(self, name: str) -> bool:
        """Whether volumes/NAME is taken: by a volume, or by something that is not one (which
        opening it as a volume names); a directory without a header is not a volume yet."""
        path = self.volume_path(name)
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return False
        return not stat.S_ISDIR(mode) or os.path.lexists(path / headers.HEADER_FILE)

    def create_volume(
        self,
        name: str,
        size: int = 0,
        labels: dict[str, str] | None = None,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        inodes: int = 0,
        uid: int | None = None,
        gid: int | None = None,
        mode: int | None = None,
    ) -> dict[str, Any]:
        """Create volume *name* if it is new; return its header.

        Creating an existing volume with the same options changes nothing; with other options
        it is refused, as ``docker volume create`` does.  A volume with a *size* gets smaller
        segments (`segment_size_for`), on which the bound of its disk use depends.  *uid*,
        *gid* and *mode* are the owner and permission bits of its root directory (None: this
        process's uid and gid, 0755), made when the volume is first opened.
        """
        labels = dict(labels or {})
        root = headers.root_key(uid, gid, mode)
        if len(msgpack.packb(labels)) > MAX_LABELS:
            raise StoreError(
                f"labels of volume {name} are too large: at most 32 KiB in all", ErrorCode.INVALID
            )
        path = self.volume_path(name)
        try:
            path.mkdir(mode=0o700)
            made = True
            _fsync_dir(path.parent)  # the new volume's name must survive a power cut too
        except FileExistsError:
            made = False
        dir_fd = self.open_dir(name)
        try:
            try:
                header = headers.read_header(name, dir_fd)
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
                    "root": root,
                }
                try:
                    journal.write_durably(
                        dir_fd, headers.HEADER_FILE, b"".join(frame.encode(header))
                    )
                except BaseException:
                    if made:  # leave no half-made volume that `ls` would trip over
                        shutil.rmtree(path, ignore_errors=True)
                    raise
                return header
        finally:
            os.close(dir_fd)
        wanted = {"size": size, "labels": labels, "inodes": inodes, "uid": uid, "gid": gid,
                  "mode": mode}  # fmt: skip
        headers.check_alike(name, header, wanted)
        return header

    def header(self, name: str) -> dict[str, Any]:
        """The header of volume *name* (no lock needed: it is replaced atomically)."""
        dir_fd = self.open_dir(name)
        try:
            return headers.read_header(name, dir_fd)
        except FileNotFoundError:
            raise StoreError(f"volume {name} does not exist", ErrorCode.NOT_FOUND) from None
        finally:
            os.close(dir_fd)

    def open_dir(self, name: str) -> int:
        path = self.volume_path(name)
        try:
            return os.open(path, _DIR_FLAGS)
        except FileNotFoundError:
            raise StoreError(f"volume {name} does not exist", ErrorCode.NOT_FOUND) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise StoreError(f"volume {name}: cannot open {path}: {exc.strerror}") from None
            problem = self.entry_problem(name) or "not a volume directory"
            raise StoreError(
                f"volume {name}: {path} is {problem}: move it out of the store"
            ) from None

    def usage(self, name: str) -> dict[str, int]:
        """The last usage figures the volume's server wrote: {"used": bytes, "inodes": n}.

        Advisory, so anything wrong with the file (missing, damaged, not a file) gives {}."""
        try:
            dir_fd = self.open_dir(name)
        except StoreError:
            return {}
        try:
            return headers.read_usage(dir_fd)
        finally:
            os.close(dir_fd)

    def is_served(self, name: str) -> bool:
        """Whether a process holds the volume's lock right now.

        False if volumes/NAME is no directory (nobody can serve that); `pidlock.NotALockFile`
        if the lock file is not a regular file."""
        try:
            dir_fd = self.open_dir(name)
        except StoreError:
            return False
        try:
            return pidlock.is_held("lock", dir_fd)
        finally:
            os.close(dir_fd)

    def served_device(self, name: str) -> str | None:
        """The device ("major:minor") of the FUSE mount serving volume *name*, as its server
        wrote it in ``volumes/NAME/device`` (one line, "major:minor\\n"); None if there is no
        such file or it holds anything else.

        Only true while the volume's lock is held: device numbers of FUSE mounts are reused
        once a mount is gone, so a caller checks `is_served` first.
        """
        try:
            dir_fd = self.open_dir(name)
        except StoreError:
            return None
        try:
            fd = os.open(DEVICE_FILE, os.O_RDONLY | _FILE_FLAGS, dir_fd=dir_fd)
            with os.fdopen(fd, "rb") as src:
                if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
                    return None
                text = src.read(64).decode("ascii", errors="replace")
        except OSError:
            return None
        finally:
            os.close(dir_fd)
        match = _DEVICE.fullmatch(text)
        return match[1] if match else None

    def record_device(self, name: str, device: str | None) -> None:
        """Write (or, with None, remove) ``volumes/NAME/device`` for `served_device`; only the
        holder of the volume's lock calls this.  Not synced: it means nothing after a crash."""
        dir_fd = self.open_dir(name)
        try:
            if device is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(DEVICE_FILE, dir_fd=dir_fd)
                return
            tmp = DEVICE_FILE + ".tmp"
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _FILE_FLAGS
            fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
            try:
                os.write(fd, f"{device}\n".encode())
            finally:
                os.close(fd)
            os.rename(tmp, DEVICE_FILE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        finally:
            os.close(dir_fd)

    def lock_holder(self, name: str) -> str:
        """The pid the volume's lock file names (for messages; "unknown" if none)."""
        dir_fd = self.open_dir(name)
        try:
            return pidlock.holder("lock", dir_fd)
        finally:
            os.close(dir_fd)

    def remove_volume(self, name: str, recursive: bool = False) -> None:
        """Destroy volume *name* and its data; refused while it is served, and while it has
        snapshots unless *recursive* (then they go too, refused while one is in use)."""
        dir_fd = self.open_dir(name)
        try:
            lock_fd = self.lock(name, dir_fd)  # nobody may start serving it meanwhile
            try:
                snapshots.check_removable(name, dir_fd, recursive)
            except BaseException:
                os.close(lock_fd)
                raise
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
        dir_fd = self.open_dir(name)
        lock_fd = -1
        try:
            lock_fd = self.lock(name, dir_fd)
            _make_volume_private(dir_fd, self.volume_path(name))
            snaps_fd = snapshots.open_dir(dir_fd)
            if snaps_fd is not None:  # what a take killed halfway left: none runs now
                try:
                    snapshots.sweep(snaps_fd)
                finally:
                    os.close(snaps_fd)
            try:
                header = headers.read_header(name, dir_fd)
            except FileNotFoundError:
                raise StoreError(f"volume {name} does not exist", ErrorCode.NOT_FOUND) from None
            volume = Volume(name, dir_fd, lock_fd, header["id"], header["segment_size"])
            volume.header = header
            volume.quota = header.get("size", 0)
            volume.inode_limit = header.get("inodes", 0)
            try:
                volume.load(time.time_ns())
            except OSError as exc:
                if exc.errno != errno.ELOOP or exc.filename is None:
                    raise
                path = self.volume_path(name) / exc.filename  # opened relative to the dir
                raise StoreError(
                    f"volume {name}: {path} is a symbolic link: volfs follows no links in "
                    "its store; remove it (or put the file itself there)"
                ) from None
        except BaseException:
            os.close(dir_fd)
            if lock_fd >= 0:
                os.close(lock_fd)
            raise
        return volume

    def resize(
        self, name: str, size: int | None = None, inodes: int | None = None
    ) -> dict[str, Any]:
        """Give volume *name*, which must not be served, a new size and inode limit (None:
        keep; 0: none); return its new header.

        The volume is loaded (as a mount would) to know exactly what it holds: making it
        smaller than that is refused.
        """
        if self.is_served(name):
            raise StoreError(
                f"volume {name} is mounted: unmount it to resize it "
                "(a mounted volume cannot be resized yet)",
                ErrorCode.BUSY,
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
    def lock(name: str, dir_fd: int) -> int:
        """Take the volume's lock; it lasts until the returned fd closes or the process ends."""
        try:
            return pidlock.take("lock", dir_fd)
        except pidlock.LockHeld as held:
            raise StoreError(
                f"volume {name} is already being served (pid {held.holder}): "
                "unmount it there first, or add a mount point of that mount",
                ErrorCode.ALREADY_SERVED,
            ) from None


#: The one mode of each kind of file in a store: private to the store's owner.
_PRIVATE = {stat.S_IFDIR: 0o700, stat.S_IFREG: 0o600}


def _repair_mode(fd: int, path: Path) -> None:
    """Set the mode of the directory or regular file open at *fd* to its private one."""
    st = os.fstat(fd)
    wanted = _PRIVATE.get(stat.S_IFMT(st.st_mode))
    mode = stat.S_IMODE(st.st_mode)
    if wanted is None or mode == wanted:
        return
    try:
        os.fchmod(fd, wanted)
    except OSError as exc:
        raise StoreError(
            f"{path} has mode {mode:04o}, open to other users, and cannot be made "
            f"{wanted:04o}: {exc.strerror}; run as the store's owner"
        ) from None
    logger.warning(
        "%s had mode %04o, open to other users (they may have read it); set it to %04o",
        path, mode, wanted,
    )  # fmt: skip


def _repair_entry(dir_fd: int, name: str, path: Path) -> None:
    """`_repair_mode` of entry *name* of *dir_fd*, if it is a directory or regular file.

    Opened without following a link and without blocking on a FIFO, and checked through the
    fd, so that what is changed is what was checked."""
    try:
        fd = os.open(name, os.O_RDONLY | _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO):
            return  # gone meanwhile, a link, a socket: nothing of ours to repair
        raise StoreError(f"cannot check the mode of {path}: {exc.strerror}") from None
    try:
        _repair_mode(fd, path)
    finally:
        os.close(fd)


def _make_volume_private(dir_fd: int, path: Path) -> None:
    """Give a volume directory and each file in it their private modes (see `_make_private`)."""
    _repair_mode(dir_fd, path)
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                _repair_entry(dir_fd, entry.name, path / entry.name)


def _check_real_dir(path: Path, what: str) -> None:
    """Refuse *path* if it is there but is not a directory of its own (a link, a file)."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(mode):
        raise StoreError(
            f"{what} is {_kind(mode)}, not a directory: volfs follows no links in its store; "
            f"put the directory itself at {path}"
        )


def open_log(root: Path, name: str) -> BinaryIO:
    """Open log file *name* of store root *root* for appending (its logs/ made if missing).

    Never through a symbolic link, and only a regular file: a link planted at logs/NAME.log
    would have the daemon append to (and create) files anywhere; a FIFO would hang the open.
    """
    logs = Path(root) / "logs"
    path = logs / name
    with contextlib.suppress(FileExistsError):
        logs.mkdir(mode=0o700)
    _check_real_dir(logs, "log directory")
    dir_fd = os.open(logs, _DIR_FLAGS)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | _FILE_FLAGS
        try:
            fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise StoreError(f"cannot open log file {path}: {exc.strerror}") from None
            mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            raise StoreError(_not_a_log(path, mode)) from None
    finally:
        os.close(dir_fd)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise StoreError(_not_a_log(path, mode))
    os.set_blocking(fd, True)  # a regular file after all: the flag only guarded the open
    return os.fdopen(fd, "ab")


def _not_a_log(path: Path, mode: int) -> str:
    return (
        f"log file {path} is {_kind(mode)}, not a regular file: volfs follows no links in its "
        "store; remove it"
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
