"""`volfsd import`: a new volume from a tar archive (a file, or stdin) or from a directory.

An archive may be hostile, and import runs as root, so nothing is extracted onto a host path:
every member is written through the store's writing `Volume`, into the new volume's own tree,
and can land nowhere else.  Names are checked before anything is made of them: absolute names
and ``..`` components are refused, as is a member beneath a member that is not a directory (a
symlink, say: import never follows a link), a hard link to a name not earlier in the archive
(or to a directory), and a name given twice (but a directory given again, which only updates
its attributes).  Device nodes are kept: importing is root's, as making the archive was.

The volume is built in a store root of its own, hidden in ``volumes/.importing-NAME-XXXXXXXX``
(not a volume name, so `ls` never shows it), locked while it is built, then renamed into place
once complete and closed: an import killed halfway leaves no half volume that looks whole, and
the next import removes what it left.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import stat
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Never, cast

from pyfuse3 import FUSEError
from tqdm import tqdm

from volfs import archive
from volfs.archive import MODE_OF_KIND, ArchiveError, Member, ReadData
from volfs.catalog import parse_gid, parse_mode, parse_size, parse_uid
from volfs.errors import ErrorCode, NoSpace, VolfsError
from volfs.localmodel import LocalView
from volfs.posix import NAME_MAX, PATH_MAX, XATTR_SIZE_MAX, check_xattr_name
from volfs.store import pidlock
from volfs.store.extents import CHUNK_SIZE
from volfs.store.headers import check_name
from volfs.store.root import StoreRoot
from volfs.store.state import ROOT_INO

if TYPE_CHECKING:
    from volfs.model import Node, VolumeView

logger = logging.getLogger(__name__)
STAGING_PREFIX = ".importing-"
#: What a directory gets that the archive names only as the parent of a member.
IMPLIED_DIR_MODE = 0o755


def clean_path(raw: bytes) -> bytes:
    """A member's name as a relative path without ``.`` or empty components (``.`` for the
    root); `ArchiveError` for an absolute name, a ``..`` component or a bad component."""
    shown = raw.decode(errors="replace")[:200]
    if raw.startswith(b"/"):
        raise ArchiveError(f"archive member {shown!r} has an absolute name: refused")
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise ArchiveError(f"archive member {shown!r} has a '..' component: refused")
    if any(len(p) > NAME_MAX or b"\0" in p for p in parts):
        raise ArchiveError(f"archive member {shown!r} has a name longer than {NAME_MAX} bytes")
    return b"/".join(parts) or b"."


class Builder:
    """Makes members in a new volume through a view of it (`volfs.model.VolumeView`: the
    store's `Volume`, or one transaction of a cluster engine's volume); `finish` sets what
    making the rest changed (the directories' times)."""

    def __init__(self, volume: VolumeView, progress: tqdm[Never]) -> None:
        self.volume = volume
        self.progress = progress
        self.now = time.time_ns()
        self._dirs: dict[bytes, tuple[Node, Member | None]] = {b".": (self._root(), None)}

    def _root(self) -> Node:
        root = self.volume.inode(ROOT_INO)
        assert root is not None
        return root

    def _made(self, inode: Node) -> Node:
        """The view's own node of *inode*, just created (made from the record)."""
        made = self.volume.inode(inode.ino)
        assert made is not None
        return made

    def add(self, member: Member, read: ReadData) -> None:
        path = clean_path(member.path)
        _check_numbers(path, member)
        if path == b".":
            self._set_dir(path, self._root(), member)
            return
        parent_path, _, name = path.rpartition(b"/")
        parent = self._directory(parent_path or b".", path)
        existing = self.volume.child(parent, name)
        if existing is not None:
            if member.kind == "dir" and stat.S_ISDIR(existing.mode):
                self._set_dir(path, existing, member)
                return
            raise ArchiveError(f"archive member {_shown(path)!r} appears twice: refused")
        if member.kind == "hardlink":
            self._link(parent, name, path, member)
            return
        self._make(parent, name, path, member, read)

    def _directory(self, path: bytes, wanted_by: bytes) -> Node:
        """The directory at *path*, made (with `IMPLIED_DIR_MODE`) where the archive has none."""
        found = self._dirs.get(path)
        if found is not None:
            return found[0]
        parent, at = self._root(), b""
        for name in path.split(b"/"):  # a loop, not recursion: a name may have 2,000 parts
            at = _join(at or b".", name)
            found = self._dirs.get(at)
            if found is not None:
                parent = found[0]
                continue
            if self.volume.child(parent, name) is not None:  # not a directory, or in _dirs
                raise ArchiveError(
                    f"archive member {_shown(wanted_by)!r} lies beneath "
                    f"{_shown(at)!r}, which is not a directory: refused"
                )
            inode = self.volume.new_inode(stat.S_IFDIR | IMPLIED_DIR_MODE, 0, 0, 0, self.now)
            self.volume.create(parent, name, inode, self.now)
            parent = self._made(inode)
            self._dirs[at] = (parent, None)
        return parent

    def _link(self, parent: Node, name: bytes, path: bytes, member: Member) -> None:
        target = clean_path(member.target)
        found = self._lookup(target)
        if found is None or stat.S_ISDIR(found.mode):
            what = "a directory" if found is not None else "not earlier in the archive"
            raise ArchiveError(f"archive member {_shown(path)!r} is a hard link to "
                               f"{_shown(target)!r}, {what}: refused")  # fmt: skip
        self.volume.link(found, parent, name, self.now)

    def _lookup(self, path: bytes) -> Node | None:
        inode: Node | None = self._root()
        for part in path.split(b"/") if path != b"." else ():
            if inode is None or not stat.S_ISDIR(inode.mode):
                return None
            inode = self.volume.child(inode, part)
        return inode

    def _make(self, parent: Node, name: bytes, path: bytes, member: Member, read: ReadData) -> None:
        mode = MODE_OF_KIND[member.kind] | member.mode
        rdev = os.makedev(*member.rdev) if member.kind in ("char", "block") else 0
        inode = self.volume.new_inode(mode, member.uid, member.gid, rdev, self.now)
        inode.atime_ns, inode.mtime_ns = member.atime_ns, member.mtime_ns
        if member.kind == "symlink":
            if not member.target or len(member.target) >= PATH_MAX:
                raise ArchiveError(f"archive member {_shown(path)!r}: symlink target empty or "
                                   f"longer than {PATH_MAX - 1} bytes")  # fmt: skip
            inode.target, inode.size = member.target, len(member.target)
        self.volume.create(parent, name, inode, self.now)
        inode = self._made(inode)
        self._xattrs(path, inode, member)
        if member.kind == "dir":
            self._dirs[path] = (inode, member)
        elif member.kind == "file":
            for offset, length in member.regions:
                self._write(inode, offset, length, read)
            self.volume.set_attrs(inode, size=member.size, atime_ns=member.atime_ns,
                                  mtime_ns=member.mtime_ns, ctime_ns=self.now)  # fmt: skip

    def _write(self, inode: Node, offset: int, length: int, read: ReadData) -> None:
        end = offset + length
        while offset < end:
            n = min(end, (offset // CHUNK_SIZE + 1) * CHUNK_SIZE) - offset
            data = read(offset, n)
            if len(data) != n:
                raise ArchiveError("archive ends inside a member's data (truncated?)")
            self.volume.write(inode, offset, data, self.now)
            self.progress.update(n)
            offset += n

    def _xattrs(self, path: bytes, inode: Node, member: Member) -> None:
        for key, value in member.xattrs.items():
            try:
                check_xattr_name(key)
                refused = key.startswith(b"system.") or len(value) > XATTR_SIZE_MAX
            except FUSEError:
                refused = True
            if refused or (key.startswith(b"user.") and member.kind not in ("file", "dir")):
                logger.warning("archive member %r: xattr %r left out (volfs does not keep it)",
                               _shown(path), key.decode(errors="replace"))  # fmt: skip
                continue
            self.volume.set_xattr(inode, key, value, self.now)

    def _set_dir(self, path: bytes, inode: Node, member: Member) -> None:
        self._dirs[path] = (inode, member)
        self.volume.set_attrs(inode, mode=stat.S_IFDIR | member.mode, uid=member.uid,
                              gid=member.gid, ctime_ns=self.now)  # fmt: skip
        self._xattrs(path, inode, member)

    def finish(self) -> None:
        """Give the directories the times the archive says: making their entries changed
        them."""
        for inode, member in self._dirs.values():
            mtime = self.now if member is None else member.mtime_ns
            atime = self.now if member is None else member.atime_ns
            self.volume.set_attrs(inode, atime_ns=atime, mtime_ns=mtime, ctime_ns=self.now)


def _check_numbers(path: bytes, member: Member) -> None:
    """Refuse ids, times and device numbers the store cannot hold (a hostile archive's)."""
    ids = (member.uid, member.gid, *member.rdev)
    times = (member.mtime_ns, member.atime_ns)
    if not all(0 <= n < 2**32 for n in ids) or not all(-(2**63) <= t < 2**63 for t in times):
        raise ArchiveError(f"archive member {_shown(path)!r}: owner, device number or time "
                           "out of range: refused")  # fmt: skip
    if member.size < 0 or any(o < 0 or n < 0 for o, n in member.regions):
        raise ArchiveError(f"archive member {_shown(path)!r}: negative size: refused")


def _shown(path: bytes) -> str:
    return path.decode(errors="replace")[:200]


# -- sources ------------------------------------------------------------------------------------


def directory_members(top: Path) -> Iterator[tuple[Member, ReadData]]:
    """The tree at *top* as members (hard links as such, holes kept); no link is followed."""
    top_fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield from _tree(top_fd, None, b".", {})
    finally:
        os.close(top_fd)


def _tree(dir_fd: int, name: bytes | None, path: bytes,
          seen: dict[tuple[int, int], bytes]) -> Iterator[tuple[Member, ReadData]]:  # fmt: skip
    """The entry *name* of *dir_fd* (None: the directory *dir_fd* itself), and what is in it."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    st = os.stat(name if name is not None else ".", dir_fd=dir_fd, follow_symlinks=False)
    kind = next((k for k, t in MODE_OF_KIND.items() if stat.S_IFMT(st.st_mode) == t), None)
    if kind is None:
        logger.warning("%s: a socket, left out (tar keeps none either)", _shown(path))
        return
    member = Member(path, kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                    st.st_mtime_ns, st.st_atime_ns)  # fmt: skip
    key = (st.st_dev, st.st_ino)
    if kind != "dir" and st.st_nlink > 1 and key in seen:
        member.kind, member.target = "hardlink", seen[key]
        yield member, _no_data
        return
    seen[key] = path
    proc = f"/proc/self/fd/{dir_fd}" + (f"/{os.fsdecode(name)}" if name is not None else "")
    member.xattrs = {os.fsencode(k): os.getxattr(proc, k, follow_symlinks=False)
                     for k in os.listxattr(proc, follow_symlinks=False)}  # fmt: skip
    if kind == "symlink":
        assert name is not None
        member.target = os.readlink(name, dir_fd=dir_fd)
    elif kind in ("char", "block"):
        member.rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
    if kind in ("file", "dir"):
        fd = _open_noatime(name if name is not None else ".", flags, dir_fd)
        try:
            if kind == "file":
                member.size, member.regions = st.st_size, _file_regions(fd, st.st_size)
                yield member, lambda offset, length: os.pread(fd, length, offset)
                return
            yield member, _no_data
            for entry in sorted(os.listdir(fd)):
                yield from _tree(fd, os.fsencode(entry), _join(path, os.fsencode(entry)), seen)
        finally:
            os.close(fd)
        return
    yield member, _no_data


def _open_noatime(name: str | bytes, flags: int, dir_fd: int) -> int:
    """Open without touching the access time the member carries (the owner's and root's
    privilege: others read with the time updated, if the mount's atime rules say so)."""
    try:
        return os.open(name, flags | os.O_NOATIME, dir_fd=dir_fd)
    except PermissionError:
        return os.open(name, flags, dir_fd=dir_fd)


def _join(path: bytes, name: bytes) -> bytes:
    return name if path == b"." else path + b"/" + name


def _no_data(_offset: int, _length: int) -> bytes:
    return b""


def _file_regions(fd: int, size: int) -> list[tuple[int, int]]:
    """The data regions of a host file (SEEK_DATA/SEEK_HOLE): its holes stay holes."""
    regions, at = [], 0
    while at < size:
        try:
            start = os.lseek(fd, at, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from here
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        regions.append((start, end - start))
        at = end
    return regions


# -- the verb -----------------------------------------------------------------------------------


def options(found: dict[str, str], size: str | None, labels: dict[str, str]) -> dict[str, Any]:
    """The new volume's settings: the archive's (`volfs.*`), overridden by the flags given."""
    try:
        chosen: dict[str, Any] = {
            "size": parse_size(size) if size is not None else int(found.get("size", "0")),
            "labels": {**json.loads(found.get("labels", "{}")), **labels},
            "inodes": int(found.get("inodes", "0")),
        }
        for key, parse in (("uid", parse_uid), ("gid", parse_gid), ("mode", parse_mode)):
            chosen[key] = parse(found[key] if key == "mode" else int(found[key])) \
                if key in found else None  # fmt: skip
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise ArchiveError(
            f"archive: invalid volfs.* setting in its global header: {exc}"
        ) from None
    if chosen["size"] < 0 or chosen["inodes"] < 0:
        raise ArchiveError("archive: volfs.size and volfs.inodes must not be negative")
    if not all(isinstance(v, str) for v in chosen["labels"].values()):
        raise ArchiveError("archive: volfs.labels must be a JSON object of strings")
    return chosen


def sweep(store: StoreRoot) -> None:
    """Remove what imports killed halfway left: staging roots whose volume nobody locks."""
    for entry in (store.path / "volumes").iterdir():
        if not entry.name.startswith(STAGING_PREFIX) or entry.is_symlink():
            continue
        held = False
        for vol in (entry / "volumes").glob("*"):
            with contextlib.suppress(OSError):
                fd = os.open(vol, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    held = held or pidlock.is_held("lock", fd)
                finally:
                    os.close(fd)
        if not held:
            shutil.rmtree(entry, ignore_errors=True)


def import_volume(store_path: Path, name: str, source: str, size: str | None,
                  labels: dict[str, str]) -> None:  # fmt: skip
    """Make volume *name* from *source*: a tar file, ``-`` (a tar on stdin) or a directory."""
    store = StoreRoot(store_path)
    if store.exists(check_name(name)):
        raise VolfsError(f"volume {name} exists: import into a new name, or remove it first "
                         f"('volfsd rm {name}')", ErrorCode.EXISTS)  # fmt: skip
    sweep(store)
    with _source(source) as (found, members):
        _build(store, name, found, size, labels, members)


@contextlib.contextmanager
def _source(source: str) -> Iterator[tuple[dict[str, str], Iterator[tuple[Member, ReadData]]]]:
    """The settings an archive carries (none for a directory) and its members."""
    if source != "-" and Path(source).is_dir():
        yield {}, directory_members(Path(source))
        return
    if source == "-" and sys.stdin.isatty():
        raise VolfsError("import reads the archive from stdin, a terminal: give FILE or pipe "
                         "the archive in", ErrorCode.INVALID)  # fmt: skip
    with contextlib.ExitStack() as stack:
        raw = sys.stdin.buffer if source == "-" else stack.enter_context(open(source, "rb"))
        stream = not stat.S_ISREG(os.fstat(raw.fileno()).st_mode)  # a pipe, a FIFO: read once
        tar = stack.enter_context(archive.open_archive(raw, stream=stream))
        yield archive.settings(tar), archive.members(tar)


def import_to_engine(url: str, engine: str, name: str, source: str, size: str | None) -> None:
    """Make volume *name* on the cluster engine *engine* (its database at *url*) from
    *source*, as `import_volume` does: the volume is created empty, then filled in one
    transaction, so a failure leaves nothing of the archive; the empty volume is removed
    again.  (A new volume no host serves yet: nothing else can make that transaction retry,
    and should something do so, the import fails rather than run twice on a read stream.)"""
    from volfs.pg.model import PgModel  # the driver loads only for a cluster engine
    from volfs.pg.schema import create_volume, remove_volume

    with _source(source) as (found, members):
        chosen = options(found, size, {})
        create_volume(url, check_name(name), chosen["size"], chosen["inodes"],
                      chosen["uid"] or 0, chosen["gid"] or 0,
                      0o755 if chosen["mode"] is None else chosen["mode"])  # fmt: skip
        attempts = 0

        def fill(view: VolumeView) -> None:
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                raise VolfsError(f"engine {engine}: the import of {name} was interrupted by "
                                 "another change to it: nothing imported; try again")  # fmt: skip
            with tqdm(unit="B", unit_scale=True, desc=f"import {name}", file=sys.stderr,
                      disable=not sys.stderr.isatty()) as progress:  # fmt: skip
                builder = Builder(view, progress)
                for member, read in members:
                    builder.add(member, read)
                builder.finish()
            view.sync()

        model = PgModel(url, name)
        try:
            model.open()
            model.run_sync(fill)
        except BaseException as exc:
            model.close()
            with contextlib.suppress(VolfsError):
                remove_volume(url, name)
            if isinstance(exc, NoSpace):
                raise VolfsError(f"volume {name}: the archive does not fit in its size or inode "
                                 "limit: import it with a larger --size",
                                 ErrorCode.NO_SPACE) from None  # fmt: skip
            raise
        model.close()


def _build(store: StoreRoot, name: str, found: dict[str, str], size: str | None,
           labels: dict[str, str], source: Iterator[tuple[Member, ReadData]]) -> None:  # fmt: skip
    chosen = options(found, size, labels)
    staging_path = store.path / "volumes" / f"{STAGING_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
    try:
        staging = StoreRoot(staging_path)
        staging.create_volume(name, chosen["size"], chosen["labels"], inodes=chosen["inodes"],
                              uid=chosen["uid"], gid=chosen["gid"],
                              mode=chosen["mode"])  # fmt: skip
        volume = staging.open_volume(name, create=False)
        try:
            with tqdm(unit="B", unit_scale=True, desc=f"import {name}", file=sys.stderr,
                      disable=not sys.stderr.isatty()) as progress:  # fmt: skip
                builder = Builder(cast("VolumeView", LocalView(volume)), progress)
                for member, read in source:
                    builder.add(member, read)
                builder.finish()
            volume.sync()
        except NoSpace:
            raise VolfsError(
                f"volume {name}: the archive does not fit in its size or inode "
                "limit: import it with a larger --size",
                ErrorCode.NO_SPACE,
            ) from None
        finally:
            volume.close()
        _publish(staging.volume_path(name), store.volume_path(name), name)
    finally:
        shutil.rmtree(staging_path, ignore_errors=True)


def _publish(built: Path, path: Path, name: str) -> None:
    try:
        os.rename(built, path)  # onto nothing, or an empty directory (an interrupted create)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
            raise VolfsError(f"volume {name} was created meanwhile: import into a new name",
                             ErrorCode.EXISTS) from None  # fmt: skip
        raise
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
