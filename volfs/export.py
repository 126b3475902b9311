"""`volfsd export`: a volume that is not mounted, or a snapshot, as a POSIX pax tar
(`volfs.archive`).

The volume is read as fsck reads it: loaded read-only (`open_readonly`), with the volume's lock
held meanwhile so that no worker starts serving it halfway through.  A mounted volume is
refused.  A snapshot (``NAME@SNAP``) is loaded read-only under its shared lock (`history.load`),
so that it cannot be removed meanwhile, whether its volume is mounted or not; the archive has
the same members and the same settings header (the volume's settings now) as an export of the
volume would have had when the snapshot was taken.

The archive goes to stdout, or to FILE, which appears only complete: it is written beside FILE
under a hidden name, fsynced, then renamed over it.  Data that fails its checksum fails the
export, naming every damaged path; FILE then does not appear.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Never

from tqdm import tqdm

from volfs.archive import Member, PaxWriter
from volfs.errors import DataDamaged, ErrorCode, VolfsError
from volfs.store import history, naming, pidlock, readonly, snapshots
from volfs.store.headers import check_name
from volfs.store.root import StoreRoot
from volfs.store.state import ROOT_INO, Inode

#: Bytes read from the store at a time.
PIECE = 1 << 20
_KIND = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
         stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo"}  # fmt: skip


def data_regions(inode: Inode) -> list[tuple[int, int]]:
    """The (offset, length) ranges of a regular file that hold data, adjacent extents merged:
    the rest of the file is holes (the extent map has no extent there)."""
    regions: list[tuple[int, int]] = []
    for ext in inode.extents or ():
        start, end = ext.start, min(ext.start + ext.length, inode.size)
        if start >= end:
            continue
        if regions and sum(regions[-1]) == start:
            regions[-1] = (regions[-1][0], end - regions[-1][0])
        else:
            regions.append((start, end - start))
    return regions


def settings_of(header: dict[str, object], root: Inode) -> dict[str, str]:
    """The volume's settings for the archive's global header (`volfs.*` keys)."""
    return {
        "name": str(header["name"]),
        "size": str(header.get("size") or 0),
        "inodes": str(header.get("inodes") or 0),
        "labels": json.dumps(header.get("labels") or {}, sort_keys=True),
        "uid": str(root.uid),
        "gid": str(root.gid),
        "mode": f"{stat.S_IMODE(root.mode):04o}",
    }


class Exporter:
    """Writes the tree of a loaded snapshot to a `PaxWriter`, noting damaged paths."""

    def __init__(
        self, loaded: readonly.ReadOnlyState, writer: PaxWriter, progress: tqdm[Never]
    ) -> None:
        self.loaded = loaded
        self.writer = writer
        self.progress = progress
        self.damaged: list[str] = []
        self._first_path: dict[int, bytes] = {}  #: inode -> the path it was archived under

    def run(self) -> None:
        root = self.loaded.inodes[ROOT_INO]
        self.writer.write_global(settings_of(self.loaded.header, root))
        pending = [(b".", root)]
        while pending:
            path, inode = pending.pop()
            self._member(path, inode)
            if inode.entries is not None:
                children = sorted(inode.entries.items(), reverse=True)
                for name, ino in children:
                    child_path = name if path == b"." else path + b"/" + name
                    pending.append((child_path, self.loaded.inodes[ino]))

    def _member(self, path: bytes, inode: Inode) -> None:
        kind = _KIND[stat.S_IFMT(inode.mode)]
        member = Member(path, kind, stat.S_IMODE(inode.mode), inode.uid, inode.gid,
                        inode.mtime_ns, inode.atime_ns)  # fmt: skip
        if inode.ino == ROOT_INO and not inode.ctime_ns:  # never mounted: no times recorded
            member.mtime_ns = member.atime_ns = int(self.loaded.header.get("created_ns") or 0)
        member.xattrs = dict(inode.xattrs or {})
        if kind in ("char", "block"):
            member.rdev = (os.major(inode.rdev), os.minor(inode.rdev))
        if kind == "symlink":
            member.target = inode.target or b""
        if kind != "dir" and inode.nlink > 1:
            first = self._first_path.setdefault(inode.ino, path)
            if first != path:
                member.kind, member.target, member.xattrs = "hardlink", first, {}
        if member.kind == "file":
            member.size, member.regions = inode.size, data_regions(inode)
        self.writer.write_member(member, self._data(path, inode, member.regions))

    def _data(self, path: bytes, inode: Inode, regions: list[tuple[int, int]]) -> Iterator[bytes]:
        for offset, length in regions:
            for at in range(offset, offset + length, PIECE):
                n = min(PIECE, offset + length - at)
                try:
                    chunk = self.loaded.read(inode, at, n)
                except DataDamaged:
                    chunk = bytes(n)  # the archive stays well formed; the export fails below
                    name = "/" + path.decode(errors="replace")
                    if not self.damaged or self.damaged[-1] != name:
                        self.damaged.append(name)
                self.progress.update(n)
                yield chunk


def _output(path: Path | None) -> tuple[BinaryIO, Path | None]:
    """Where the archive is written: stdout, or a new hidden file beside *path*."""
    if path is None:
        if sys.stdout.isatty():
            raise VolfsError("export writes the archive to stdout, a terminal: give -o FILE "
                             "or pipe it", ErrorCode.INVALID)  # fmt: skip
        return open(sys.stdout.fileno(), "wb", buffering=PIECE, closefd=False), None
    aside = path.with_name(f".{path.name}.partial-{os.getpid()}")
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    return open(fd, "wb", buffering=PIECE), aside


def _publish(out: BinaryIO, aside: Path, path: Path) -> None:
    out.flush()
    os.fsync(out.fileno())
    out.close()
    os.rename(aside, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _lock(volume_dir: Path, name: str) -> int:
    """The volume's lock, so that no worker serves it while it is exported."""
    try:
        return pidlock.take_in(volume_dir, "lock")
    except FileNotFoundError:
        raise VolfsError(f"no such volume: {name}", ErrorCode.NOT_FOUND) from None
    except pidlock.LockHeld:
        raise VolfsError(
            f"volume {name} is mounted: export it through the daemon (which exports a "
            "snapshot of it), or unmount it",
            ErrorCode.BUSY,
        ) from None


def export(store: Path, name: str, path: Path | None) -> None:
    """Write volume *name* (or snapshot ``NAME@SNAP``) of the store at *store* as a pax tar
    to *path* (None: stdout)."""
    volume, at, snap = name.partition("@")
    if at:
        volume, snap = snapshots.parse_name(name)
    volume_dir = Path(store) / "volumes" / check_name(volume)
    if not (volume_dir / "volume").is_file():
        raise VolfsError(f"no such volume: {volume}", ErrorCode.NOT_FOUND)
    # Reads log each damaged block; the export names the damaged paths itself, once.
    read_log = logging.getLogger(naming.__name__)
    read_log.disabled = True
    try:
        if at:
            loaded, held = history.load(StoreRoot(store), volume, snap)
        else:
            held = _lock(volume_dir, name)
            try:
                loaded = readonly.open_readonly(volume_dir, name)
            except BaseException:
                os.close(held)
                raise
        try:
            if loaded.damage or loaded.unfit or not loaded.replayed:
                raise VolfsError(f"{_what(name)} has damaged metadata: run 'volfsd fsck {name}' "
                                 "to see what", ErrorCode.DAMAGED)  # fmt: skip
            _write(loaded, name, path)
        finally:
            loaded.close()
            os.close(held)
    finally:
        read_log.disabled = False


def _what(name: str) -> str:
    return f"snapshot {name}" if "@" in name else f"volume {name}"


def _write(loaded: readonly.ReadOnlyState, name: str, path: Path | None) -> None:
    out, aside = _output(path)
    done = False
    try:
        total = loaded.data_bytes() or None  # 0 would draw an empty bar
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"export {name}",
                  disable=not sys.stderr.isatty(), file=sys.stderr) as progress:  # fmt: skip
            exporter = Exporter(loaded, PaxWriter(out), progress)
            exporter.run()
            exporter.writer.close()
        if exporter.damaged:
            shown = ", ".join(exporter.damaged[:20])
            more = f" and {len(exporter.damaged) - 20} more" if len(exporter.damaged) > 20 else ""
            raise VolfsError(f"{_what(name)}: data of {shown}{more} fails its checksum: export "
                             f"failed (run 'volfsd fsck {name}')", ErrorCode.DAMAGED)  # fmt: skip
        if aside is not None and path is not None:
            _publish(out, aside, path)
        else:
            out.flush()
        done = True
    finally:
        if not done and aside is not None:
            with contextlib.suppress(OSError):
                out.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(aside)
