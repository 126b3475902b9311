"""Power cuts, simulated at the store's system-call layer.

A SIGKILL loses nothing the store wrote: the bytes are in the OS page cache.  A power cut loses
whatever the page cache held that no fsync had pushed to the disk.  `Recorder` stands in for the
``os`` module of the store's modules while a workload runs and logs every call that changes a
store file (open with O_CREAT or O_TRUNC, write, pwrite, pwritev, ftruncate, fsync, fdatasync,
rename, unlink); the writes still reach the real files, which so hold the page cache's view.
`Recorder.image` then builds what a disk could hold after a power cut at any point of that log:

* a file's content as of its last fsync/fdatasync is durable; each later write or truncation
  may be lost, kept, or kept in part: writes are torn at 512-byte sector boundaries (a sector is
  old or new, never a mix);
* a directory entry made or changed (create, rename, unlink) is durable only once the directory
  itself was fsynced; later ones may or may not have reached the disk;
* what survives of the rest is chosen by a `Mode`: nothing, everything, a prefix in call order,
  each file's own prefix with the directories' changes in order (what ext4's ordered mode
  comes close to), or any subset (each sector on its own; a lost write may still have grown
  the file, leaving zeros).

The real fsync calls are not made at all: durability is what this model says, not what the
test machine's disk did.  Directories other than the ones that existed when recording began are
not modelled (the store makes none: volumes are created before a recording starts).
"""

from __future__ import annotations

import functools
import io
import os
import random
import stat
from collections.abc import Iterable
from enum import Enum
from pathlib import Path

from volfs.store import checkpoints, headers, journal, log, pidlock, root, space, volume

SECTOR = 512
_CHUNK = 64 * 1024
_ZEROS = bytes(_CHUNK)
#: The store modules whose ``os`` the recorder stands in for.
STORE_MODULES = (log, journal, root, volume, pidlock, checkpoints, space, headers)
#: Calls that would change files in ways the model does not follow: refused while recording.
UNMODELLED = (
    "replace",
    "remove",
    "truncate",
    "mkdir",
    "makedirs",
    "rmdir",
    "link",
    "symlink",
    "writev",
    "copy_file_range",
    "sendfile",
    "mknod",
)


class Mode(Enum):
    """Which of the writes and directory changes no fsync covered survive the power cut."""

    NONE = "none"  #: only what was fsynced
    ALL = "all"  #: everything (what a SIGKILL leaves)
    PREFIX = "prefix"  #: everything up to some sector write or directory change, in call order
    ORDERED = "ordered"  #: a prefix of each file's own writes; directory changes in order
    SUBSET = "subset"  #: each sector write, truncation and directory change on its own


class Image:
    """The store root's files as a power cut left them: directories and (dir, name) -> bytes."""

    def __init__(self, dirs: Iterable[str], files: dict[tuple[str, str], bytes]) -> None:
        self.dirs = sorted(dirs)
        self.files = files

    def write_to(self, top: Path) -> None:
        """Make the files under *top* (runs of zeros become holes: the reserve file is big)."""
        for rel in self.dirs:
            (top / rel).mkdir(parents=True, exist_ok=True)
        for (rel, name), data in self.files.items():
            with open(top / rel / name, "wb") as out:
                view = memoryview(data)
                for start in range(0, len(data), _CHUNK):
                    piece = view[start : start + _CHUNK]
                    if piece != _ZEROS[: len(piece)]:
                        out.seek(start)
                        out.write(piece)
                out.truncate(len(data))

    def describe(self) -> str:
        return ", ".join(
            f"{rel}/{name}:{len(data)}" for (rel, name), data in sorted(self.files.items())
        )


def scan(top: Path) -> Image:
    """The files under *top* as they are now."""
    dirs, files = [], {}
    for path, _subdirs, names in os.walk(top):
        rel = os.path.relpath(path, top)
        dirs.append(rel)
        for name in names:
            full = os.path.join(path, name)
            if not stat.S_ISREG(os.lstat(full).st_mode):
                raise AssertionError(f"the power-cut model only knows regular files: {full}")
            files[rel, name] = Path(full).read_bytes()
    return Image(dirs, files)


class _RecordingFile(io.RawIOBase):
    """The raw file under a buffered writer made by ``os.fdopen``: its writes are recorded."""

    def __init__(self, proxy: _StoreOs, fd: int, closefd: bool) -> None:
        super().__init__()
        self._proxy = proxy
        self._fd = fd
        self._closefd = closefd

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def write(self, data) -> int:
        return self._proxy.write(self._fd, bytes(data))

    def close(self) -> None:
        if not self.closed:
            super().close()
            if self._closefd:
                self._proxy.close(self._fd)


class _StoreOs:
    """What the store modules see as ``os`` while recording: the real module, with the calls
    that change files logged by the recorder."""

    def __init__(self, recorder: Recorder) -> None:
        self._rec = recorder

    def __getattr__(self, name: str):
        if name in UNMODELLED:
            raise AssertionError(f"the power-cut recorder does not model os.{name}")
        return getattr(os, name)

    def open(self, path, flags, mode=0o777, *, dir_fd=None):
        created = False
        if flags & os.O_CREAT:
            try:
                os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                created = True
        fd = os.open(path, flags, mode, dir_fd=dir_fd)
        try:
            self._rec.opened(fd, path, dir_fd, flags, created)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def close(self, fd):
        self._rec.fds.pop(fd, None)
        os.close(fd)

    def pwritev(self, fd, buffers, offset):
        done = os.pwritev(fd, buffers, offset)
        self._rec.wrote(fd, offset, b"".join(bytes(b) for b in buffers)[:done])
        return done

    def pwrite(self, fd, data, offset):
        done = os.pwrite(fd, data, offset)
        self._rec.wrote(fd, offset, bytes(data[:done]))
        return done

    def write(self, fd, data):
        offset = os.lseek(fd, 0, os.SEEK_CUR)
        done = os.write(fd, data)
        self._rec.wrote(fd, offset, bytes(data[:done]))
        return done

    def ftruncate(self, fd, length):
        os.ftruncate(fd, length)
        self._rec.add("trunc", self._rec.file_of(fd), length)

    def posix_fallocate(self, fd, offset, length):
        os.posix_fallocate(fd, offset, length)
        self._rec.add("grow", self._rec.file_of(fd), offset + length)

    def fsync(self, fd):
        self._rec.synced(fd)

    def fdatasync(self, fd):
        self._rec.synced(fd)

    def rename(self, src, dst, *, src_dir_fd=None, dst_dir_fd=None):
        old = self._rec.where(src, src_dir_fd)
        new = self._rec.where(dst, dst_dir_fd)
        os.rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        if old is None and new is None:
            return
        if old is None or new is None or old[0] != new[0]:
            raise AssertionError(f"the power-cut model has no rename between directories: {new}")
        self._rec.add("rename", old[0], old[1], new[1])

    def unlink(self, path, *, dir_fd=None):
        where = self._rec.where(path, dir_fd)
        os.unlink(path, dir_fd=dir_fd)
        if where is not None:
            self._rec.add("unlink", *where)

    def fdopen(self, fd, mode="r", buffering=-1, closefd=True, **kwargs):
        if not any(c in mode for c in "wa+"):
            return os.fdopen(fd, mode, buffering, closefd=closefd, **kwargs)
        size = buffering if buffering > 1 else io.DEFAULT_BUFFER_SIZE
        return io.BufferedWriter(_RecordingFile(self, fd, closefd), buffer_size=size)


class Recorder:
    """Log the calls that change files under *top* while active (a context manager).

    The events, in call order:

    * ``("create", dir, name, file)``, ``("rename", dir, old, new)``, ``("unlink", dir, name)``
    * ``("write", file, offset, bytes)``, ``("trunc", file, size)``, ``("grow", file, size)``
      (posix_fallocate: the file grows to at least *size*)
    * ``("fsync", file)``, ``("dirsync", dir)`` (fsync and fdatasync are alike here)
    * ``("synced", state)``: a `SegmentLog.sync` returned (*state*: the workload's `state`)
    * ``("begin", state)``: the workload starts the operation that leads to *state*
    * ``("note", text)``: a workload's landmark

    *file* is a number the recorder gives each file it sees (a name may come to mean another
    file); *dir* is a directory's path relative to *top*.
    """

    active: Recorder | None = None

    def __init__(self, top: Path) -> None:
        self.top = Path(os.path.realpath(top))
        base = scan(self.top)
        self.dirs = list(base.dirs)
        self.base_entries: dict[str, dict[str, int]] = {rel: {} for rel in base.dirs}
        self.base_content: dict[int, bytes] = {}
        self._by_inode: dict[tuple[int, int], int] = {}
        for (rel, name), data in base.files.items():
            file = len(self.base_content)
            self.base_content[file] = data
            self.base_entries[rel][name] = file
            st = os.lstat(self.top / rel / name)
            self._by_inode[st.st_dev, st.st_ino] = file
        self._next_file = len(self.base_content)
        self.fds: dict[int, tuple[str, object]] = {}
        self.events: list[tuple] = []
        self.state = 0  #: the workload's current state number, stamped on "synced" events
        self._saved: list[tuple[object, str, object]] = []

    # -- installing ------------------------------------------------------------------------

    def __enter__(self) -> Recorder:
        if Recorder.active is not None:
            raise AssertionError("one power-cut recorder at a time")
        proxy = _StoreOs(self)
        for module in STORE_MODULES:
            self._saved.append((module, "os", module.os))
            module.os = proxy
        real_sync = log.SegmentLog.sync

        @functools.wraps(real_sync)
        def sync(segment_log):
            end = real_sync(segment_log)
            self.events.append(("synced", self.state))
            return end

        self._saved.append((log.SegmentLog, "sync", real_sync))
        log.SegmentLog.sync = sync
        Recorder.active = self
        return self

    def __exit__(self, *exc) -> None:
        while self._saved:
            owner, name, value = self._saved.pop()
            setattr(owner, name, value)
        Recorder.active = None

    # -- recording -------------------------------------------------------------------------

    def add(self, *event) -> None:
        self.events.append(event)

    def begin(self, state: int) -> None:
        self.events.append(("begin", state))

    def rel(self, path: str) -> str | None:
        rel = os.path.relpath(os.path.realpath(path), self.top)
        return None if rel == ".." or rel.startswith("../") else rel

    def _dir_path(self, dir_fd: int | None) -> str:
        if dir_fd is None:
            return os.getcwd()
        kind, what = self.fds.get(dir_fd, (None, None))
        if kind == "dir":
            return str(self.top / what)
        return os.readlink(f"/proc/self/fd/{dir_fd}")

    def where(self, path, dir_fd: int | None) -> tuple[str, str] | None:
        """(directory relative to top, name) of *path*, or None if it lies elsewhere."""
        full = os.path.join(self._dir_path(dir_fd), os.fsdecode(path))
        parent, name = os.path.split(full)
        rel = self.rel(parent)
        if rel is None:
            return None
        if rel not in self.base_entries:
            raise AssertionError(f"the power-cut model does not know directory {rel}")
        return rel, name

    def opened(self, fd: int, path, dir_fd: int | None, flags: int, created: bool) -> None:
        self.fds.pop(fd, None)  # the number may have meant another file before
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            rel = self.rel(os.readlink(f"/proc/self/fd/{fd}"))
            if rel is not None:
                self.fds[fd] = ("dir", rel)
            return
        where = self.where(path, dir_fd)
        if where is None:
            return
        if created:
            file = self._next_file
            self._next_file += 1
            self._by_inode[st.st_dev, st.st_ino] = file
            self.add("create", where[0], where[1], file)
        else:
            file = self._by_inode.get((st.st_dev, st.st_ino))
            if file is None:
                raise AssertionError(f"{where} appeared behind the power-cut recorder's back")
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            self.add("trunc", file, 0)
        self.fds[fd] = ("file", file)

    def file_of(self, fd: int) -> int:
        kind, what = self.fds.get(fd, (None, None))
        if kind != "file":
            raise AssertionError(f"fd {fd} was not opened through the power-cut recorder")
        return what

    def wrote(self, fd: int, offset: int, data: bytes) -> None:
        if data:
            self.add("write", self.file_of(fd), offset, data)

    def synced(self, fd: int) -> None:
        os.fstat(fd)  # EBADF as the real call would; the durability itself is modelled
        kind, what = self.fds.get(fd, (None, None))
        if kind == "dir":
            self.add("dirsync", what)
        else:
            self.add("fsync", self.file_of(fd))

    # -- power cuts --------------------------------------------------------------------------

    def durable_state(self, cut: int) -> int:
        """The workload state that the syncs before event *cut* made durable (0: none)."""
        return max((e[1] for e in self.events[:cut] if e[0] == "synced"), default=0)

    def begun_state(self, cut: int) -> int:
        """The last workload state whose operation began before event *cut*."""
        return max((e[1] for e in self.events[:cut] if e[0] == "begin"), default=0)

    def images(self, cuts: Iterable[int], modes: Iterable[Mode], rng: random.Random):
        """Yield (cut, mode, image) for each cut point (an event count) in *cuts*, ascending."""
        content = {f: bytearray(d) for f, d in self.base_content.items()}
        durable = dict(self.base_content)
        pending: dict[int, list] = {}  # file -> [(event index, op)] since its last fsync
        entries = {rel: dict(e) for rel, e in self.base_entries.items()}
        durable_entries = {rel: dict(e) for rel, e in self.base_entries.items()}
        dir_pending: dict[str, list] = {}
        done = 0
        for cut, mode in zip(cuts, modes, strict=True):
            if cut < done:
                raise ValueError("cut points must ascend")
            for index in range(done, cut):
                event = self.events[index]
                kind = event[0]
                if kind == "write":
                    _, file, offset, data = event
                    _apply(content[file], ("write", offset, data))
                    pending.setdefault(file, []).append((index, ("write", offset, data)))
                elif kind in ("trunc", "grow"):
                    _, file, size = event
                    _apply(content[file], (kind, size))
                    pending.setdefault(file, []).append((index, (kind, size)))
                elif kind == "fsync":
                    durable[event[1]] = bytes(content[event[1]])
                    pending.pop(event[1], None)
                elif kind == "dirsync":
                    durable_entries[event[1]] = dict(entries[event[1]])
                    dir_pending.pop(event[1], None)
                elif kind in ("create", "rename", "unlink"):
                    rel = event[1]
                    if kind == "create":
                        content[event[3]] = bytearray()
                        durable[event[3]] = b""
                    _change_entry(entries[rel], event)
                    dir_pending.setdefault(rel, []).append((index, event))
            done = cut
            yield cut, mode, self._image(mode, rng, durable, pending, durable_entries, dir_pending)

    def _image(self, mode, rng, durable, pending, durable_entries, dir_pending) -> Image:
        # Every change no fsync covered, as units that survive or not: sector writes,
        # truncations, directory changes; each keyed by (event index, piece) for call order.
        units: list[tuple[tuple[int, int], object, tuple]] = []
        for file, ops in pending.items():
            for index, op in ops:
                if op[0] == "write":
                    for n, piece in enumerate(_sectors(op[1], op[2])):
                        units.append(((index, n), file, piece))
                else:
                    units.append(((index, 0), file, op))
        for rel, changes in dir_pending.items():
            for index, event in changes:
                units.append(((index, 0), rel, event))
        units.sort(key=lambda u: u[0])
        kept = _choose(mode, units, rng)
        grown = set()
        if mode is Mode.SUBSET:  # a lost write whose new file size reached the disk anyway
            grown = {id(u) for u in units if id(u) not in kept and rng.random() < 0.15}
        files = {f: bytearray(durable[f]) for f in pending}
        dirs = {rel: dict(e) for rel, e in durable_entries.items()}
        for unit in units:
            _, owner, op = unit
            if id(unit) in kept:
                if isinstance(owner, str):
                    _change_entry(dirs[owner], op)
                else:
                    _apply(files[owner], op)
            elif id(unit) in grown and op[0] == "write":
                buf = files[owner]
                end = op[1] + len(op[2])
                if end > len(buf):
                    buf.extend(bytes(end - len(buf)))
        out = {}
        for rel, names in dirs.items():
            for name, file in names.items():
                data = files.get(file)
                out[rel, name] = bytes(data) if data is not None else durable[file]
        return Image(self.dirs, out)

    def check_complete(self) -> None:
        """The model with every change kept must be what the files hold now (the page
        cache's view): otherwise some change escaped the recorder."""
        cut = len(self.events)
        _, _, image = next(self.images([cut], [Mode.ALL], random.Random(0)))
        real = scan(self.top)
        missing = set(real.files) ^ set(image.files)
        assert not missing, f"files the recorder did not follow: {sorted(missing)}"
        differ = [k for k in real.files if real.files[k] != image.files[k]]
        assert not differ, f"content the recorder did not follow: {differ}"


def _sectors(offset: int, data: bytes) -> list[tuple]:
    """A write split at sector boundaries: each piece reaches the disk whole or not at all."""
    pieces = []
    start = 0
    while start < len(data):
        end = min(len(data), (offset + start) // SECTOR * SECTOR + SECTOR - offset)
        pieces.append(("write", offset + start, data[start:end]))
        start = end
    return pieces


def _choose(mode: Mode, units: list, rng: random.Random) -> set[int]:
    if mode is Mode.NONE or not units:
        return set()
    if mode is Mode.ALL:
        return {id(u) for u in units}
    if mode is Mode.PREFIX:
        return {id(u) for u in units[: rng.randint(0, len(units))]}
    if mode is Mode.SUBSET:
        p = rng.choice([0.1, 0.5, 0.9])
        return {id(u) for u in units if rng.random() < p}
    # ORDERED: each file keeps a prefix of its own changes; directory changes, one prefix.
    by_owner: dict[object, list] = {}
    for unit in units:
        by_owner.setdefault("dirs" if isinstance(unit[1], str) else unit[1], []).append(unit)
    kept = set()
    for owned in by_owner.values():
        kept.update(id(u) for u in owned[: rng.randint(0, len(owned))])
    return kept


def _apply(buf: bytearray, op: tuple) -> None:
    if op[0] == "write":
        _, offset, data = op
        if offset > len(buf):
            buf.extend(bytes(offset - len(buf)))
        buf[offset : offset + len(data)] = data
    else:
        size = op[1]
        if size < len(buf):
            if op[0] == "trunc":
                del buf[size:]
        else:
            buf.extend(bytes(size - len(buf)))


def _change_entry(names: dict[str, int], event: tuple) -> None:
    """Apply a directory change; one whose source did not survive changes nothing."""
    kind = event[0]
    if kind == "create":
        names[event[2]] = event[3]
    elif kind == "rename":
        if event[2] in names:
            names[event[3]] = names.pop(event[2])
    elif kind == "unlink":
        names.pop(event[2], None)
