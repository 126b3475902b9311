"""Tar archives of volumes: a POSIX pax writer, and members read from any tar.

The writer is our own, about a hundred lines of the pax format (POSIX.1-2001), because the
standard library's tarfile writes pax times as floats (nanoseconds lost) and cannot write sparse
members, and libarchive-c's binding exposes neither sparse maps nor xattrs.  What it writes:

* one global header (typeflag ``g``) with the volume's settings as ``volfs.*`` keys;
* per member an extended header (typeflag ``x``) with ``path``/``linkpath`` (when the ustar
  fields cannot hold them), ``mtime`` and ``atime`` as ``SECONDS.NNNNNNNNN``, ``uid``/``gid``/
  ``size`` when they exceed their octal fields, and ``SCHILY.xattr.NAME`` per xattr (the key
  GNU tar's ``--xattrs`` reads and writes);
* a file with holes as a GNU sparse 1.0 member: ``GNU.sparse.major=1``, ``GNU.sparse.minor=0``,
  ``GNU.sparse.name`` (the real path), ``GNU.sparse.realsize``; its data starts with the map in
  decimal lines (the count, then offset and length of each data region) padded to 512 bytes,
  followed by the regions' bytes.  The map always ends at the file's size (a last region of
  length 0 if the file ends in a hole), as GNU tar writes it.

Reading uses the standard library's tarfile (pax, ustar, GNU and their sparse formats), taking
times and xattrs from the raw pax records so that nothing is rounded.
"""

from __future__ import annotations

import base64
import os
import stat
import tarfile
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, BinaryIO

from volfs.errors import ErrorCode, VolfsError

BLOCK = 512
#: Prefix of the global header's keys for the volume's settings.
SETTING_PREFIX = "volfs."
_XATTR = "SCHILY.xattr."
_LIBARCHIVE_XATTR = "LIBARCHIVE.xattr."
_KINDS = {
    "file": tarfile.REGTYPE,
    "hardlink": tarfile.LNKTYPE,
    "symlink": tarfile.SYMTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "dir": tarfile.DIRTYPE,
    "fifo": tarfile.FIFOTYPE,
}
#: The file type bits of each member kind (a hard link takes its target's).
MODE_OF_KIND = {"file": stat.S_IFREG, "symlink": stat.S_IFLNK, "char": stat.S_IFCHR,
                "block": stat.S_IFBLK, "dir": stat.S_IFDIR, "fifo": stat.S_IFIFO}  # fmt: skip
#: Reads *length* bytes at *offset* of a member's data.
ReadData = Callable[[int, int], bytes]


class ArchiveError(VolfsError):
    """An archive that cannot be read, or a member that may not be imported."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCode.INVALID)


@dataclass(slots=True)
class Member:
    """One entry of an archive, as volfs writes and reads it.

    *path* is relative, components separated by ``/``, ``.`` for the root; *target* is a
    symlink's target or, for a hard link, the path of the member it links to; *regions* are
    the (offset, length) ranges of a file that hold data, the rest being holes."""

    path: bytes
    kind: str
    mode: int  #: permission bits (at most 0o7777)
    uid: int
    gid: int
    mtime_ns: int
    atime_ns: int
    size: int = 0
    target: bytes = b""
    rdev: tuple[int, int] = (0, 0)  #: major, minor
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    regions: list[tuple[int, int]] = field(default_factory=list)

    def sparse(self) -> bool:
        return self.regions != ([(0, self.size)] if self.size else [])


def _record(key: str, value: bytes) -> bytes:
    """One pax record, ``LENGTH KEY=VALUE\\n``, LENGTH counting itself."""
    body = b" " + key.encode() + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


def _pax_time(ns: int) -> bytes:
    sign, ns = ("-", -ns) if ns < 0 else ("", ns)
    return f"{sign}{ns // 10**9}.{ns % 10**9:09d}".encode()


def parse_pax_time(text: str) -> int:
    """Nanoseconds from a pax time (``[-]SECONDS[.FRACTION]``), exactly."""
    sign = -1 if text.startswith("-") else 1
    whole, _, fraction = text.lstrip("-").partition(".")
    try:
        return sign * (int(whole or "0") * 10**9 + int((fraction + "000000000")[:9]))
    except ValueError:
        raise ArchiveError(f"archive: invalid pax time {text[:40]!r}") from None


def _octal(value: int, width: int) -> bytes | None:
    digits = f"{value:o}".encode()
    return digits.rjust(width - 1, b"0") + b"\0" if value >= 0 and len(digits) < width else None


def _padding(length: int) -> bytes:
    return bytes(-length % BLOCK)


class PaxWriter:
    """Writes a pax archive to *out*, member by member; `close` ends it."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._serial = 0

    def write_global(self, settings: dict[str, str]) -> None:
        """The global header: each setting as ``volfs.KEY``."""
        records = b"".join(_record(SETTING_PREFIX + k, v.encode()) for k, v in settings.items())
        self._extended(b"volfs-settings", tarfile.XGLTYPE, records)

    def write_member(self, member: Member, chunks: Iterable[bytes]) -> None:
        """*member*, then its data: *chunks* hold its regions' bytes in order."""
        records = [_record("mtime", _pax_time(member.mtime_ns)),
                   _record("atime", _pax_time(member.atime_ns))]  # fmt: skip
        name = member.path + b"/" if member.kind == "dir" else member.path
        if member.path == b".":
            name = b"./"
        data_size, map_block = (member.size if member.kind == "file" else 0), b""
        if member.kind == "file" and member.sparse():
            regions = list(member.regions)
            if not regions or sum(regions[-1]) < member.size:
                regions.append((member.size, 0))
            lines = [str(len(regions))] + [f"{o}\n{n}" for o, n in regions]
            map_block = ("\n".join(lines) + "\n").encode()
            map_block += _padding(len(map_block))
            data_size = len(map_block) + sum(n for _, n in regions)
            records += [_record("GNU.sparse.major", b"1"), _record("GNU.sparse.minor", b"0"),
                        _record("GNU.sparse.name", member.path),
                        _record("GNU.sparse.realsize", str(member.size).encode())]  # fmt: skip
            name = b"GNUSparseFile.0/" + os.path.basename(member.path)[:80]
        elif len(name) > 100 or not name.isascii():
            records.append(_record("path", name))
        if len(member.target) > 100 or not member.target.isascii():
            records.append(_record("linkpath", member.target))
        fields = {"uid": member.uid, "gid": member.gid, "size": data_size}
        for key, number in fields.items():
            if _octal(number, 12 if key == "size" else 8) is None:
                records.append(_record(key, str(number).encode()))
        for xattr, value in sorted(member.xattrs.items()):
            records.append(_record(_XATTR + xattr.decode("utf-8", "surrogateescape"), value))
        self._extended(name, tarfile.XHDTYPE, b"".join(records))
        self._out.write(self._header(name, member, data_size))
        written = 0
        if map_block:
            self._out.write(map_block)
            written = len(map_block)
        for chunk in chunks:
            self._out.write(chunk)
            written += len(chunk)
        if written != data_size:
            raise AssertionError(f"{member.path!r}: {written} bytes of data, not {data_size}")
        self._out.write(_padding(data_size))

    def close(self) -> None:
        self._out.write(bytes(2 * BLOCK))

    def _extended(self, name: bytes, typeflag: bytes, records: bytes) -> None:
        self._serial += 1
        header_name = b"PaxHeaders/" + os.path.basename(name.rstrip(b"/"))[:80]
        info = Member(header_name, "file", 0o644, 0, 0, 0, 0, len(records))
        self._out.write(self._header(header_name, info, len(records), typeflag))
        self._out.write(records + _padding(len(records)))

    @staticmethod
    def _header(name: bytes, m: Member, size: int, typeflag: bytes | None = None) -> bytes:
        link = m.target if m.kind in ("symlink", "hardlink") else b""
        seconds = m.mtime_ns // 10**9
        parts = [
            name[:100].ljust(100, b"\0"),
            _octal(m.mode & 0o7777, 8) or b"",
            _octal(m.uid, 8) or _octal(0, 8) or b"",
            _octal(m.gid, 8) or _octal(0, 8) or b"",
            _octal(size, 12) or _octal(0, 12) or b"",
            _octal(seconds, 12) or _octal(0, 12) or b"",
            b" " * 8,  # the checksum, counted as spaces
            typeflag or _KINDS[m.kind],
            link[:100].ljust(100, b"\0"),
            b"ustar\x0000",
            bytes(64),  # uname, gname: none, so the numeric ids are what extraction uses
            _octal(m.rdev[0], 8) or b"",
            _octal(m.rdev[1], 8) or b"",
            bytes(155 + 12),
        ]
        header = bytearray(b"".join(parts))
        header[148:156] = f"{sum(header):06o}\0 ".encode()
        return bytes(header)


# -- reading ------------------------------------------------------------------------------------


def settings(archive: tarfile.TarFile) -> dict[str, str]:
    """The ``volfs.*`` settings of the archive's global header (without the prefix)."""
    return {k[len(SETTING_PREFIX) :]: v for k, v in archive.pax_headers.items()
            if k.startswith(SETTING_PREFIX)}  # fmt: skip


def _xattrs(pax: Mapping[str, str]) -> dict[bytes, bytes]:
    found = {}
    for key, value in pax.items():
        if key.startswith(_XATTR):
            name = key[len(_XATTR) :].encode("utf-8", "surrogateescape")
            found[name] = value.encode("utf-8", "surrogateescape")
        elif key.startswith(_LIBARCHIVE_XATTR):  # bsdtar: URL-encoded name, base64 value
            name = urllib.parse.unquote_to_bytes(key[len(_LIBARCHIVE_XATTR) :])
            found[name] = base64.b64decode(value + "=" * (-len(value) % 4))
    return found


def _kind(info: tarfile.TarInfo) -> str:
    for kind, typeflag in _KINDS.items():
        if info.type == typeflag or (kind == "file" and info.type in tarfile.REGULAR_TYPES):
            return kind
    raise ArchiveError(
        f"archive member {info.name[:200]!r} is of a kind volfs does not import "
        f"(tar type {info.type!r})"
    )


def member_of(info: tarfile.TarInfo) -> Member:
    """A tar member as a `Member` (its path as the archive spells it, not yet checked)."""
    pax = info.pax_headers
    mtime = parse_pax_time(pax["mtime"]) if "mtime" in pax else int(info.mtime) * 10**9
    atime = parse_pax_time(pax["atime"]) if "atime" in pax else mtime
    kind = _kind(info)
    member = Member(os.fsencode(info.name), kind, info.mode & 0o7777, info.uid, info.gid,
                    mtime, atime, info.size if kind == "file" else 0)  # fmt: skip
    member.target = os.fsencode(info.linkname) if kind in ("symlink", "hardlink") else b""
    member.rdev = (info.devmajor, info.devminor) if kind in ("char", "block") else (0, 0)
    member.xattrs = _xattrs(pax)
    if kind == "file":
        sparse: list[tuple[int, int]] | None = info.sparse  # type: ignore[assignment]
        regions = sparse if sparse is not None else [(0, info.size)]
        member.regions = [(offset, length) for offset, length in regions if length]
    return member


def members(archive: tarfile.TarFile) -> Iterator[tuple[Member, ReadData]]:
    """Each member of *archive* with a reader of its data, in archive order."""
    infos = iter(archive)
    while True:
        try:
            info = next(infos, None)
        except (tarfile.TarError, EOFError) as exc:
            raise ArchiveError(
                f"archive is damaged or truncated after its last member: {exc}"
            ) from None
        if info is None:
            return
        member = member_of(info)
        extracted = archive.extractfile(info) if member.kind == "file" else None
        # Its unbuffered reader: seeking that only sets a position (holes read as zeros), so a
        # stream read front to back (stdin) works too, as members' regions come in order.
        data = getattr(extracted, "raw", None)

        def read(offset: int, length: int, data: IO[bytes] | None = data) -> bytes:
            assert data is not None
            try:
                data.seek(offset)
                return data.read(length)
            except (tarfile.TarError, EOFError) as exc:
                raise ArchiveError(f"archive is damaged or truncated: {exc}") from None

        yield member, read


def open_archive(source: BinaryIO, stream: bool) -> tarfile.TarFile:
    """A tar archive (any of tarfile's formats, compressed or not) read from *source*;
    *stream* for a pipe, read once front to back."""
    try:
        return tarfile.open(fileobj=source, mode="r|*" if stream else "r:*")
    except (tarfile.TarError, EOFError):
        raise ArchiveError(
            "not a tar archive (plain, gzip, bzip2 or xz), or a damaged one"
        ) from None
