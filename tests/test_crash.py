"""Crash consistency: what a call acknowledged survives a SIGKILL of the serving process.

The promise: once write() (or create, mkdir, rename, unlink, setattr, link, symlink, setxattr)
has returned to its caller, the change is in the store, and the next mount after a crash
recovers it by itself.  Every test runs real mounts through the kernel.  The work runs in
separate writer processes (this file run as a script: see `_writer_main`) that log each call
that returned to an "ack" file on the native disk.  At some moment the test brings the server
down, in one of two ways (`HOW`): "kill" SIGKILLs the mount worker and the daemon brings the
volume back at the same path; "crash" SIGKILLs the daemon too and the test mounts again.  The
writers then fail (the kernel aborts the requests of a dead server, so they cannot hang) and
the test checks that every acknowledged change is there and intact, and that nothing shows
but those and the one call that may have been in flight.

1. a writer streaming self-describing 4 KiB records (plain, fsync, ring, large writes);
2. two writers appending records with O_APPEND to one file;
3. a writer of random metadata steps, checked against a model of the tree;
4. open unlinked files and an open removed directory;
5. one volume crashed again and again with work in between (and its store size recorded);
6. workers killed while they replay a long log;
7. a crash while the log is compacted;
8. the store's last write torn by the crash.

No timing is asserted: the delays before a crash only spread the moments it hits.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import random
import signal
import stat
import struct
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from volfs import mounts
from volfs.store import frame, records

from helpers import volfsd

# -- self-describing records -----------------------------------------------------------------

RECORD = 4096
_HEAD = struct.Struct("<4sIQ")  # magic, writer id, sequence number
_MAGIC = b"VREC"
_SUM = 8


def record(writer: int, seq: int) -> bytes:
    """Record *seq* of *writer*: header, a payload derived from both, and a checksum."""
    head = _HEAD.pack(_MAGIC, writer, seq)
    payload = hashlib.shake_128(head).digest(RECORD - _HEAD.size - _SUM)
    return head + payload + hashlib.blake2b(head + payload, digest_size=_SUM).digest()


def parse_record(buf: bytes) -> tuple[int, int] | None:
    """(writer, seq) of an intact record, else None."""
    if len(buf) != RECORD:
        return None
    magic, writer, seq = _HEAD.unpack_from(buf)
    if magic != _MAGIC or buf != record(writer, seq):
        return None
    return writer, seq


def describe(buf: bytes) -> str:
    """What a record-sized piece of a file holds, for failure messages."""
    if not buf:
        return "nothing (the file ends)"
    parsed = parse_record(buf)
    if parsed is not None:
        return f"record (writer {parsed[0]}, seq {parsed[1]})"
    if not buf.strip(b"\0"):
        return f"{len(buf)} zero bytes"
    return f"{len(buf)} bytes of garbage starting {buf[:16].hex()}"


def expected_stream(writer: int, upto: int, slots: int | None = None) -> bytes:
    """The file a single writer leaves after records 0..upto (ring of *slots* if given)."""
    if slots is None:
        return b"".join(record(writer, seq) for seq in range(upto + 1))
    buf = bytearray(min(upto + 1, slots) * RECORD)
    for seq in range(max(0, upto + 1 - slots), upto + 1):
        at = (seq % slots) * RECORD
        buf[at : at + RECORD] = record(writer, seq)
    return bytes(buf)


def _first_difference(data: bytes, want: bytes) -> str:
    for at in range(0, max(len(data), len(want)), RECORD):
        got, exp = data[at : at + RECORD], want[at : at + RECORD]
        if got != exp:
            return (
                f"at offset {at} (record {at // RECORD}): found {describe(got)}, "
                f"expected {describe(exp)}"
            )
    return "no difference"


def check_single_writer(
    data: bytes, writer: int, acked: int, in_flight: int, slots: int | None = None
) -> None:
    """Check a file one writer wrote as a stream (or a ring of *slots* records).

    *acked* is how many bytes the writer's write calls reported written.  Every one of them
    must be there and intact.  The only other thing allowed is what the write in flight when
    the server died (at most *in_flight* bytes) got into the store before: no garbage.
    """
    if slots is not None:
        done = acked // RECORD
        before = expected_stream(writer, done - 1, slots)
        after = expected_stream(writer, done, slots)
        assert data in (before, after), (
            f"ring file of writer {writer} ({done} records acknowledged, {len(data)} bytes) is "
            f"neither the acknowledged state nor that plus the write in flight: "
            f"{_first_difference(data, before)}"
        )
        return
    most = acked + in_flight
    want = expected_stream(writer, -(-most // RECORD) - 1)[:most]
    assert data[:acked] == want[:acked], (
        f"bytes of writer {writer} that write() acknowledged (0..{acked}) lost or damaged: "
        f"{_first_difference(data[:acked], want[:acked])} (file is {len(data)} bytes)"
    )
    assert want.startswith(data), (
        f"after the {acked} acknowledged bytes of writer {writer} the file holds more than the "
        f"write in flight ({in_flight} bytes), or garbage: {_first_difference(data, want)} "
        f"(file is {len(data)} bytes)"
    )


def check_appends(data: bytes, acked: dict[int, int]) -> None:
    """Check a file that writers appended whole records to with O_APPEND.

    *acked* maps each writer to the bytes its write calls reported written.
    """
    seen: dict[int, list[int]] = defaultdict(list)
    full = len(data) - len(data) % RECORD
    for at in range(0, full, RECORD):
        parsed = parse_record(data[at : at + RECORD])
        assert parsed is not None and parsed[0] in acked, (
            f"appended file ({len(data)} bytes): at offset {at}: {describe(data[at : at + RECORD])}"
        )
        seen[parsed[0]].append(parsed[1])
    for writer, acked_bytes in acked.items():
        done = acked_bytes // RECORD
        seqs = seen.get(writer, [])
        assert seqs == list(range(len(seqs))), (
            f"records of writer {writer} are not its sequence 0, 1, 2, ...: {seqs[:20]}..."
        )
        assert len(seqs) >= done, (
            f"writer {writer}: appends of {done} records returned, but the file holds only "
            f"{len(seqs)} of its records"
        )
        assert len(seqs) <= done + 1, (
            f"writer {writer}: {done} records acknowledged, but {len(seqs)} are in the file"
        )
    tail = data[full:]
    if tail:
        in_flight = [
            record(w, a // RECORD) for w, a in acked.items() if len(seen[w]) == a // RECORD
        ]
        assert any(r.startswith(tail) for r in in_flight), (
            f"appended file ends in {len(tail)} bytes that are not the start of a write in "
            f"flight: {tail[:16].hex()}"
        )


# -- a model of a directory tree, for the metadata writer ------------------------------------


class Node:
    __slots__ = ("data", "kind", "mtime", "owner", "perm", "target", "xattrs")

    def __init__(self, kind: str, perm: int | None = None, target: str | None = None) -> None:
        self.kind = kind  # "f", "d" or "l"
        self.perm = perm
        self.owner = (0, 0)  # (uid, gid): the writer runs as root
        self.mtime: int | None = None  # None: set by the server's clock, not known
        self.data = bytearray()
        self.target = target
        self.xattrs: dict[str, bytes] = {}


class Entry(NamedTuple):
    """One name in a tree, as the model expects it or as found on the mount."""

    kind: str
    perm: int | None
    owner: tuple[int, int]
    mtime: int | None  #: None in the model: any
    content: bytes | str | None  #: a file's data, a symlink's target
    xattrs: tuple
    nlink: int
    links: tuple  #: all names of a regular file

    def matches(self, want: Entry | None) -> bool:
        if want is None:
            return False
        return self == want._replace(mtime=self.mtime if want.mtime is None else want.mtime)


def trees_match(got: dict[str, Entry], want: dict[str, Entry] | None) -> bool:
    return (
        want is not None
        and got.keys() == want.keys()
        and all(entry.matches(want[path]) for path, entry in got.items())
    )


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _within(path: str, top: str) -> bool:
    """Whether *path* is *top* or below it."""
    return path == top or path.startswith(top + "/")


def payload(tag: str, size: int) -> bytes:
    return hashlib.shake_128(tag.encode()).digest(size)


class Model:
    """What the tree under the mount should look like after a sequence of steps.

    The root directory is the path "" (it is not in `paths`).
    """

    def __init__(self) -> None:
        self.root = Node("d", 0o755)
        self.nodes: dict[int, Node] = {}
        self.paths: dict[str, int] = {}  # relative path -> node id
        self._next = 0

    def _add(self, path: str, node: Node) -> None:
        self._next += 1
        self.nodes[self._next] = node
        self.paths[path] = self._next

    def node(self, path: str) -> Node:
        return self.nodes[self.paths[path]] if path else self.root

    def of_kind(self, kind: str) -> list[str]:
        return [p for p, i in self.paths.items() if self.nodes[i].kind == kind]

    def children(self, path: str) -> list[str]:
        return [p for p in self.paths if _parent(p) == path]

    def _subtree(self, top: str) -> dict[str, int]:
        return {p: i for p, i in self.paths.items() if _within(p, top)}

    def apply(self, step: tuple) -> None:
        op, *args = step
        if op == "create":
            path, perm = args
            self._add(path, Node("f", perm))
        elif op == "mkdir":
            path, perm = args
            self._add(path, Node("d", perm))
        elif op == "symlink":
            target, path = args
            self._add(path, Node("l", target=target))
        elif op == "write":
            path, offset, data = args
            node = self.node(path)
            if len(node.data) < offset:
                node.data.extend(bytes(offset - len(node.data)))
            node.data[offset : offset + len(data)] = data
            node.mtime = None
        elif op in ("truncate", "trunc_open"):
            path, size = args if op == "truncate" else (args[0], 0)
            node = self.node(path)
            if size < len(node.data):
                del node.data[size:]
            else:
                node.data.extend(bytes(size - len(node.data)))
            node.mtime = None
        elif op in ("unlink", "rmdir"):
            del self.paths[args[0]]
        elif op == "link":
            src, dst = args
            self.paths[dst] = self.paths[src]
        elif op == "rename":
            src, dst = args
            if self.paths[src] == self.paths.get(dst):
                return  # two names of one inode: rename does nothing
            self.paths.pop(dst, None)
            moved = self._subtree(src)
            for p in moved:
                del self.paths[p]
            for p, i in moved.items():
                self.paths[dst + p[len(src) :]] = i
        elif op == "exchange":
            a, b = args
            sub_a, sub_b = self._subtree(a), self._subtree(b)
            for p in (*sub_a, *sub_b):
                del self.paths[p]
            for p, i in sub_a.items():
                self.paths[b + p[len(a) :]] = i
            for p, i in sub_b.items():
                self.paths[a + p[len(b) :]] = i
        elif op == "chmod":
            path, perm = args
            self.node(path).perm = perm
        elif op == "chown":
            path, uid, gid = args
            self.node(path).owner = (uid, gid)
        elif op == "utime":
            path, mtime = args
            self.node(path).mtime = mtime
        elif op == "setxattr":
            path, name, value = args
            self.node(path).xattrs[name] = value
        elif op == "removexattr":
            path, name = args
            del self.node(path).xattrs[name]
        else:
            raise ValueError(op)

    def snapshot(self) -> dict[str, Entry]:
        names: dict[int, list[str]] = defaultdict(list)
        for p, i in self.paths.items():
            names[i].append(p)
        subdirs: dict[str, int] = defaultdict(int)
        for p in self.of_kind("d"):
            subdirs[_parent(p)] += 1
        out = {}
        for p, node in [
            ("", self.root),
            *((p, self.nodes[i]) for p, i in self.paths.items()),
        ]:
            xattrs = tuple(sorted(node.xattrs.items()))
            if node.kind == "f":
                links = tuple(sorted(names[self.paths[p]]))
                content = bytes(node.data)
                out[p] = Entry(
                    "f",
                    node.perm,
                    node.owner,
                    node.mtime,
                    content,
                    xattrs,
                    len(links),
                    links,
                )
            elif node.kind == "d":  # directory times change with their entries: not checked
                out[p] = Entry("d", node.perm, node.owner, None, None, xattrs, 2 + subdirs[p], ())
            else:
                out[p] = Entry("l", None, node.owner, node.mtime, node.target, xattrs, 1, ())
        return out


def scan(root: Path) -> dict[str, Entry]:
    """The tree under *root* (itself included, as "") in the form of `Model.snapshot`."""
    out: dict[str, Entry] = {}
    names: dict[int, list[str]] = defaultdict(list)
    pending = [""]
    while pending:
        path = pending.pop()
        full = os.path.join(root, path)
        st = os.lstat(full)
        xattrs = tuple(
            sorted(
                (name, os.getxattr(full, name, follow_symlinks=False))
                for name in os.listxattr(full, follow_symlinks=False)
            )
        )
        perm, owner = stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid)
        entry = Entry("?", st.st_mode, owner, st.st_mtime_ns, None, xattrs, st.st_nlink, ())
        if stat.S_ISREG(st.st_mode):
            with open(full, "rb") as src:
                entry = entry._replace(kind="f", perm=perm, content=src.read())
            names[st.st_ino].append(path)
            entry = entry._replace(links=st.st_ino)
        elif stat.S_ISDIR(st.st_mode):
            entry = entry._replace(kind="d", perm=perm)
            pending.extend(_join(path, name) for name in os.listdir(full))
        elif stat.S_ISLNK(st.st_mode):
            entry = entry._replace(kind="l", perm=None, content=os.readlink(full))
        out[path] = entry
    for path, entry in out.items():
        if entry.kind == "f":
            out[path] = entry._replace(links=tuple(sorted(names[entry.links])))
    return out


def _brief(entry: Entry | None) -> str:
    if entry is None:
        return "absent"
    what = {"f": "file", "d": "dir", "l": "symlink"}.get(entry.kind, entry.kind)
    text = f"{what} mode {entry.perm:o}" if entry.perm is not None else what
    text += f" owner {entry.owner[0]}:{entry.owner[1]} mtime {entry.mtime}"
    if entry.kind == "f":
        sha = hashlib.sha256(entry.content).hexdigest()[:12]
        text += f" {len(entry.content)} bytes sha {sha}"
    elif entry.kind == "l":
        text += f" -> {entry.content}"
    return text + f" nlink {entry.nlink} xattrs {dict(entry.xattrs)} links {list(entry.links)}"


def tree_diff(got: dict[str, Entry], want: dict[str, Entry], limit: int = 12) -> str:
    lines = []
    for path in sorted(set(got) | set(want)):
        if path not in got or not got[path].matches(want.get(path)):
            lines.append(
                f"  {path or '.'}: found {_brief(got.get(path))}; expected {_brief(want.get(path))}"
            )
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return "\n".join(lines[:limit]) + more


# A generator of valid steps: the writer process performs them, the checker replays them.

_OPS = {
    "save": 6,  # create tmp, write it, rename over the final name: three steps
    "write": 3,
    "mkdir": 2,
    "rmdir": 1,
    "unlink": 2,
    "link": 2,
    "symlink": 1,
    "setxattr": 2,
    "removexattr": 1,
    "chmod": 2,
    "chown": 1,
    "utime": 1,
    "truncate": 1,
    "rename": 2,
    "exchange": 1,
}
_DIR_PERMS = (0o755, 0o700, 0o750, 0o711)
_XATTRS = ("user.a", "user.b", "user.c")
_MAX_ENTRIES = 80


def _plan(rng: random.Random, model: Model, n: int) -> list[tuple]:
    """The next step (or steps, for an atomic save) that is valid on *model*."""
    files = model.of_kind("f")
    dirs = ["", *model.of_kind("d")]
    entries = list(model.paths)
    fresh = f"n{n}"
    if len(entries) > _MAX_ENTRIES:
        op = rng.choice(["unlink", "rmdir"])
    else:
        op = rng.choices(list(_OPS), weights=list(_OPS.values()))[0]
    if op == "save":
        parent = rng.choice(dirs)
        tmp = _join(parent, f".tmp.{n}")
        targets = [p for p in model.children(parent) if model.node(p).kind != "d"]
        final = rng.choice(targets) if targets and rng.random() < 0.4 else _join(parent, fresh)
        size = rng.choice([0, 1, 100, 4096, 5000, rng.randrange(1, 30000)])
        steps = [("create", tmp, rng.choice([0o644, 0o600, 0o640]))]
        if size:
            steps.append(("write", tmp, 0, payload(f"{n}", size)))
        return [*steps, ("rename", tmp, final)]
    if op == "write" and files:
        path = rng.choice(files)
        offset = rng.randrange(0, len(model.node(path).data) + 5000)
        return [("write", path, offset, payload(f"w{n}", rng.randrange(1, 20000)))]
    if op == "truncate" and files:
        path = rng.choice(files)
        if rng.random() < 0.3:
            return [("trunc_open", path)]
        return [("truncate", path, rng.randrange(0, len(model.node(path).data) + 9000))]
    if op == "chown":
        return [
            (
                "chown",
                rng.choice(["", *entries]),
                rng.choice([0, 1000]),
                rng.choice([0, 1000]),
            )
        ]
    if op == "utime":
        timed = [p for p in entries if model.node(p).kind != "d"]
        if timed:
            return [("utime", rng.choice(timed), rng.randrange(10**18))]
    if op == "rmdir":
        empty = [d for d in dirs if d and not model.children(d)]
        if empty:
            return [("rmdir", rng.choice(empty))]
        op = "unlink"
    if op == "unlink":
        victims = [p for p in entries if model.node(p).kind != "d"]
        if victims:
            return [("unlink", rng.choice(victims))]
    if op == "link" and files:
        return [("link", rng.choice(files), _join(rng.choice(dirs), fresh))]
    if op == "symlink":
        return [
            (
                "symlink",
                rng.choice([*entries, "nowhere", "../x" * 3]),
                _join(rng.choice(dirs), fresh),
            )
        ]
    if op in ("setxattr", "removexattr", "chmod"):
        targets = [p for p in ["", *entries] if model.node(p).kind != "l"]
        if targets:
            path = rng.choice(targets)
            node = model.node(path)
            if op == "chmod":
                perm = rng.choice(_DIR_PERMS) if node.kind == "d" else rng.randrange(0o1000)
                return [("chmod", path, perm)]
            if op == "removexattr" and node.xattrs:
                return [("removexattr", path, rng.choice(sorted(node.xattrs)))]
            value = payload(f"x{n}", rng.choice([0, 1, 30, 300]))
            return [("setxattr", path, rng.choice(_XATTRS), value)]
    if op == "rename" and entries:
        src = rng.choice(entries)
        kind = model.node(src).kind
        if kind == "d":
            places = [d for d in dirs if not _within(d, src)]
            replaceable = [
                p for p in model.of_kind("d") if not model.children(p) and not _within(p, src)
            ]
        else:
            places = dirs
            replaceable = [p for p in entries if model.node(p).kind != "d" and p != src]
        if replaceable and rng.random() < 0.3:
            return [("rename", src, rng.choice(replaceable))]
        return [("rename", src, _join(rng.choice(places), fresh))]
    if op == "exchange" and len(entries) >= 2:
        a, b = rng.sample(entries, 2)
        if not _within(a, b) and not _within(b, a):
            return [("exchange", a, b)]
    parent = rng.choice([d for d in dirs if d.count("/") < 3])
    return [("mkdir", _join(parent, fresh), rng.choice(_DIR_PERMS))]


def steps(seed: int) -> Iterator[tuple[tuple, Model]]:
    """Endless valid steps for *seed*, each with the model after it."""
    rng = random.Random(seed)
    model = Model()
    n = 0
    while True:
        n += 1
        for step in _plan(rng, model, n):
            model.apply(step)
            yield step, model


_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def perform(root: str, step: tuple) -> None:
    """Do *step* under *root* with one mutating system call."""
    op, *args = step
    path = os.path.join(root, args[0])
    if op == "create":
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, args[1]))
    elif op == "mkdir":
        os.mkdir(path, args[1])
    elif op == "symlink":
        os.symlink(args[0], os.path.join(root, args[1]))
    elif op == "write":
        fd = os.open(path, os.O_WRONLY)
        try:
            done = os.pwrite(fd, args[2], args[1])
        finally:
            os.close(fd)
        if done != len(args[2]):
            raise OSError(errno.EIO, f"short write: {done} of {len(args[2])} bytes")
    elif op == "truncate":
        os.truncate(path, args[1])
    elif op == "trunc_open":
        os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))
    elif op == "chown":
        os.lchown(path, args[1], args[2])
    elif op == "utime":
        os.utime(path, ns=(args[1], args[1]), follow_symlinks=False)
    elif op == "unlink":
        os.unlink(path)
    elif op == "rmdir":
        os.rmdir(path)
    elif op == "link":
        os.link(path, os.path.join(root, args[1]))
    elif op == "rename":
        os.rename(path, os.path.join(root, args[1]))
    elif op == "exchange":
        other = os.path.join(root, args[1])
        if _libc.renameat2(_AT_FDCWD, path.encode(), _AT_FDCWD, other.encode(), _RENAME_EXCHANGE):
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), path)
    elif op == "chmod":
        os.chmod(path, args[1])
    elif op == "setxattr":
        os.setxattr(path, args[1], args[2])
    elif op == "removexattr":
        os.removexattr(path, args[1])
    else:
        raise ValueError(op)


def _partly_written(before: dict, step: tuple, got: dict) -> dict | None:
    """*before* with a prefix of the in-flight write *step* applied.

    The kernel cuts one write() into several FUSE requests at page boundaries, and a crash
    can fall between them: a write that never returned may be in the store in part.
    """
    _, path, offset, data = step
    want, have = before.get(path), got.get(path)
    if want is None or have is None or want.kind != "f" or have.kind != "f":
        return None
    done = 0
    while done < len(data) and have.content[offset + done : offset + done + 1] == data[done:][:1]:
        done += 1
    content = bytearray(want.content)
    content.extend(bytes(max(0, offset - len(content))))
    content[offset : offset + done] = data[:done]
    return {
        p: e._replace(content=bytes(content), mtime=None) if e.links == want.links else e
        for p, e in before.items()
    }


def check_metadata(root: Path, seed: int, acked: int) -> dict:
    """The tree must be the model after the acknowledged steps, or after one more."""
    got = scan(root)
    before, after, in_flight = Model().snapshot(), None, None
    for k, (step, model) in enumerate(steps(seed)):
        if k == acked:
            before = model.snapshot()
        elif k == acked + 1:
            after, in_flight = model.snapshot(), step
            break
    if trees_match(got, before) or trees_match(got, after):
        return got
    if in_flight[0] == "write" and trees_match(got, _partly_written(before, in_flight, got)):
        return got
    pytest.fail(
        f"after steps 0..{acked} of seed {seed} acknowledged (step {acked + 1}, maybe in "
        f"flight, was {in_flight[:2]}), the tree differs from the acknowledged state:\n"
        f"{tree_diff(got, before)}\nand from the state one step later:\n{tree_diff(got, after)}"
    )


# -- the writer processes ----------------------------------------------------------------------


class StreamMode(NamedTuple):
    """How a stream writer writes: "plain", "fsyncN", "ringN", "batchN" or "append"."""

    append: bool = False
    slots: int | None = None  #: write records round a ring of this many
    fsync_every: int = 0  #: records between fsync calls
    batch: int = 1  #: records per write call

    @classmethod
    def parse(cls, text: str) -> StreamMode:
        kind = text.rstrip("0123456789")
        number = int(text[len(kind) :] or 0)
        if kind == "ring":
            return cls(slots=number)
        if kind == "fsync":
            return cls(fsync_every=number)
        if kind == "batch":
            return cls(batch=number)
        if kind == "append":
            return cls(append=True)
        assert kind == "plain", text
        return cls()

    @property
    def write_size(self) -> int:
        return self.batch * RECORD


def _stream(ack, path: str, writer: int, mode_text: str, limit: int) -> None:
    """Write records, acknowledging the bytes write() reported written after each call."""
    mode = StreamMode.parse(mode_text)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode.append else 0), 0o644)
    ack("open")
    total = 0
    for seq in range(0, limit, mode.batch):
        buf = memoryview(b"".join(record(writer, s) for s in range(seq, seq + mode.batch)))
        offset = (seq % mode.slots if mode.slots else seq) * RECORD
        while buf:  # a short write acknowledges what it wrote; the rest is written again
            done = os.write(fd, buf) if mode.append else os.pwrite(fd, buf, offset)
            if done <= 0:
                raise OSError(errno.EIO, "write made no progress")
            total += done
            offset += done
            buf = buf[done:]
            ack(total)
        if mode.fsync_every and (seq + mode.batch) % mode.fsync_every == 0:
            os.fsync(fd)


def _metadata(ack, root: str, seed: int, limit: int) -> None:
    os.umask(0)
    # Every call goes through a descriptor of the volume's root, as it does for a program that
    # works in the volume: when the server dies the calls fail, and none of them can reach the
    # plain directory under the detached mount point instead.
    base = f"/proc/self/fd/{os.open(root, os.O_RDONLY | os.O_DIRECTORY)}"
    ack("open")
    for k, (step, _model) in enumerate(steps(seed)):
        if k >= limit:
            return
        perform(base, step)
        ack(k)


KEEP = payload("keep", 10000)


def _orphans(ack, root: str, limit: int) -> None:
    """Leave an open unlinked file, an open removed directory and a half-unlinked file."""
    with open(os.path.join(root, "keep"), "wb") as out:
        out.write(KEEP)
    orphan = os.open(os.path.join(root, "orphan"), os.O_RDWR | os.O_CREAT, 0o644)
    os.write(orphan, payload("orphan", 70000))
    os.unlink(os.path.join(root, "orphan"))
    os.mkdir(os.path.join(root, "odir"))
    os.chdir(os.path.join(root, "odir"))
    os.rmdir(os.path.join(root, "odir"))
    half = os.open(os.path.join(root, "half"), os.O_RDWR | os.O_CREAT, 0o644)
    os.link(os.path.join(root, "half"), os.path.join(root, "alias"))
    os.unlink(os.path.join(root, "half"))
    ack("open")
    for seq in range(limit):
        os.pwrite(orphan, record(9, seq), seq * RECORD)
        if os.pwrite(half, record(7, seq), seq * RECORD) != RECORD:
            raise OSError(errno.EIO, "short write")
        ack(seq)


def _writer_main(argv: list[str]) -> int:
    role, ack_path, *args = argv
    ack_fd = os.open(ack_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def ack(text) -> None:
        os.write(ack_fd, f"{text}\n".encode())

    try:
        if role == "stream":
            _stream(ack, args[0], int(args[1]), args[2], int(args[3]))
        elif role == "meta":
            _metadata(ack, args[0], int(args[1]), int(args[2]))
        elif role == "orphans":
            _orphans(ack, args[0], int(args[1]))
        else:
            raise ValueError(role)
    except OSError as exc:
        ack(f"error {exc.errno} {exc.strerror}")
        return 0
    ack("done")
    return 0


class Acks(NamedTuple):
    started: bool
    last: int  #: bytes written (stream), step done (meta), record written (orphans); or -1
    end: str  #: the writer's last line: "error ...", "done", or "" if it said nothing more
    errno: int | None


#: What a call on the mount of a server that died may fail with.
DEAD_SERVER_ERRNOS = {errno.ENOTCONN, errno.ECONNABORTED, errno.EIO}


class Writer:
    """A writer process (this file run as a script) and the ack file it logs to."""

    def __init__(self, tmp: Path, name: str, role: str, *args: object) -> None:
        self.name = name
        self.ack_path = tmp / f"{name}.ack"
        self.out_path = tmp / f"{name}.out"
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, role, str(self.ack_path), *map(str, args)],
                cwd=tmp,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def _output(self) -> str:
        return self.out_path.read_text(errors="replace")[-2000:]

    def acks(self) -> Acks:
        started, last, end, code = False, -1, "", None
        with contextlib.suppress(FileNotFoundError):
            for line in self.ack_path.read_text().splitlines():
                if line == "open":
                    started = True
                elif line.isdigit():
                    last = int(line)
                else:
                    end = line
                    if line.startswith("error "):
                        code = int(line.split()[1])
        return Acks(started, last, end, code)

    def wait_started(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.acks().started:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"writer {self.name} ended before starting: {self.acks()} {self._output()}"
                )
            assert time.monotonic() < deadline, f"writer {self.name} did not start"
            time.sleep(0.01)

    def wait_dead(self, timeout: float = 60) -> Acks:
        """Wait for the writer to fail on the dead mount; return what it acknowledged."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"writer {self.name} hung after the server was killed: {self.acks()}")
        acks = self.acks()
        assert code == 0, f"writer {self.name} crashed (status {code}): {self._output()}"
        assert acks.errno in DEAD_SERVER_ERRNOS, (
            f"writer {self.name} should have failed on the dead mount, but ended with "
            f"{acks.end!r} (acked up to {acks.last}); output: {self._output()}"
        )
        return acks

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(60)


@contextlib.contextmanager
def writers(tmp: Path, *specs: tuple) -> Iterator[list[Writer]]:
    """Start a writer per (name, role, *args); kill and reap them all however the test ends."""
    started: list[Writer] = []
    try:
        for spec in specs:
            started.append(Writer(tmp, *spec))
        yield started
    finally:
        for writer in started:
            writer.stop()


#: How the server goes down: "kill" SIGKILLs the worker, and the daemon brings the volume back
#: at the same path; "crash" SIGKILLs the daemon too, and the next mount recovers the volume.
HOW = ("kill", "crash")


def _wait_served(path: Path, timeout: float = 60) -> None:
    """Wait until *path* is served again: the dead mount stays there until the daemon has
    put the new worker's mount beneath it, and statfs (unlike stat) always asks the server."""
    deadline = time.monotonic() + timeout
    while True:
        entry = mounts.find_mount(path)
        if entry is not None and entry.fstype == mounts.FSTYPE:
            with contextlib.suppress(OSError):
                os.statvfs(path)
                return
        assert time.monotonic() < deadline, f"{path} was not mounted again"
        time.sleep(0.02)


def bring_down(volume, how: str) -> Path:
    """Crash the volume's server; return the path where it is served again."""
    if how == "kill":
        volume.kill()
        _wait_served(volume.path)
        return volume.path
    assert how == "crash", how
    return volume.mount(volume.crash())


def crash_during(volume, tmp: Path, delay: float, how: str, *specs: tuple) -> tuple[list, Path]:
    """Run writers, crash the server *delay* s after they all started.

    Return what each writer acknowledged and where the volume is served again.
    """
    with writers(tmp, *specs) as procs:
        for proc in procs:
            proc.wait_started()
        time.sleep(delay)
        path = bring_down(volume, how)
        acks = [proc.wait_dead() for proc in procs]
    print(f"{how} {delay:.3f} s after the writers started: {acks}")
    return acks, path


def store_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in store.iterdir() if p.is_file())


def use_segment_size(volume, size: int) -> None:
    """Create the volume and make its log start a new segment file every *size* bytes."""
    volume.mount()
    volume.unmount()
    path = volume.store / "volume"
    raw = path.read_bytes()
    head = frame.HEADER.size
    meta_len, _, _ = frame.decode_header(raw[:head])
    header = frame.decode_meta(raw[:head], raw[head : head + meta_len])
    header["segment_size"] = size
    path.write_bytes(b"".join(frame.encode(header)))


def _jitter(delay: float, salt: object) -> float:
    """*delay* moved a little, reproducibly per test case."""
    return delay * random.Random(f"{delay}{salt}").uniform(0.8, 1.2)


# -- 1. a streaming writer ---------------------------------------------------------------------

STREAM_CASES = [
    (0.05, "plain", None, "kill"),
    (0.2, "plain", None, "crash"),
    (0.8, "plain", None, "kill"),
    (0.15, "fsync16", None, "kill"),
    (0.25, "batch48", None, "crash"),
    (0.3, "ring37", None, "kill"),
    (0.25, "plain", 64 * 1024, "kill"),
    (0.4, "fsync16", 200 * 1024, "crash"),
]


def _crash_stream(volume, tmp: Path, delay: float, mode: str, segment_size, how: str) -> None:
    if segment_size:
        use_segment_size(volume, segment_size)
    mnt = volume.mount()
    spec = ("w", "stream", mnt / "stream", 0, mode, 10**7)
    (acks,), new = crash_during(volume, tmp, delay, how, spec)
    data = (new / "stream").read_bytes()
    parsed = StreamMode.parse(mode)
    check_single_writer(data, 0, acks.last, parsed.write_size, parsed.slots)
    # The recovered state is the volume's now: a clean remount (checkpoint) keeps it.
    new = volume.remount()
    assert (new / "stream").read_bytes() == data


@pytest.mark.parametrize(("delay", "mode", "segment_size", "how"), STREAM_CASES)
def test_streaming_writer_killed(volume, tmp_path, delay, mode, segment_size, how):
    _crash_stream(volume, tmp_path, _jitter(delay, mode), mode, segment_size, how)


@pytest.mark.slow
@pytest.mark.parametrize("case", range(40))
def test_streaming_writer_killed_many(volume, tmp_path, case):
    rng = random.Random(case)
    mode = rng.choice(["plain", "plain", "fsync1", "fsync16", "ring37", "ring300", "batch48"])
    segment_size = rng.choice([None, None, 64 * 1024, 1024 * 1024])
    delay = rng.uniform(0.01, 3.0)
    _crash_stream(volume, tmp_path, delay, mode, segment_size, rng.choice(HOW))


# -- 2. two appenders --------------------------------------------------------------------------


def _crash_appends(volume, tmp: Path, delay: float, how: str) -> None:
    target = volume.path / "log"
    acks, new = crash_during(
        volume,
        tmp,
        delay,
        how,
        ("a1", "stream", target, 1, "append", 10**7),
        ("a2", "stream", target, 2, "append", 10**7),
    )
    data = (new / "log").read_bytes()
    check_appends(data, {1: acks[0].last, 2: acks[1].last})
    new = volume.remount()
    assert (new / "log").read_bytes() == data


@pytest.mark.parametrize(("delay", "how"), [(0.1, "kill"), (0.3, "crash"), (0.6, "kill")])
def test_two_appenders_killed(volume, mnt, tmp_path, delay, how):
    _crash_appends(volume, tmp_path, _jitter(delay, "append"), how)


@pytest.mark.slow
@pytest.mark.parametrize("case", range(20))
def test_two_appenders_killed_many(volume, mnt, tmp_path, case):
    rng = random.Random(case)
    _crash_appends(volume, tmp_path, rng.uniform(0.01, 3.0), rng.choice(HOW))


# -- 3. metadata -------------------------------------------------------------------------------


def _crash_metadata(volume, tmp: Path, seed: int, delay: float, how: str) -> None:
    spec = ("m", "meta", volume.path, seed, 10**7)
    (acks,), new = crash_during(volume, tmp, delay, how, spec)
    tree = check_metadata(new, seed, acks.last)
    new = volume.remount()
    assert scan(new) == tree, "a clean remount after recovery changed the tree"


def test_metadata_model_matches_without_crash(volume, mnt, tmp_path):
    """The step model agrees with volfs when nothing crashes (so crash failures are real)."""
    with writers(tmp_path, ("m", "meta", mnt, 99, 400)) as (proc,):
        assert proc.proc.wait(60) == 0
    acks = proc.acks()
    assert acks.end == "done", f"metadata writer failed without a crash: {acks}"
    check_metadata(mnt, 99, acks.last)
    check_metadata(volume.remount(), 99, acks.last)


@pytest.mark.parametrize(
    ("seed", "delay", "how"),
    [(1, 0.05, "kill"), (2, 0.2, "crash"), (3, 0.35, "kill"), (4, 0.5, "crash"), (5, 0.7, "kill")],
)
def test_metadata_writer_killed(volume, mnt, tmp_path, seed, delay, how):
    _crash_metadata(volume, tmp_path, seed, _jitter(delay, seed), how)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 140))
def test_metadata_writer_killed_many(volume, mnt, tmp_path, seed):
    rng = random.Random(seed)
    _crash_metadata(volume, tmp_path, seed, rng.uniform(0.01, 4.0), rng.choice(HOW))


# -- 4. open but unlinked ----------------------------------------------------------------------


@pytest.mark.parametrize("how", HOW)
def test_kill_with_open_unlinked_file(volume, mnt, tmp_path, how):
    (acks,), new = crash_during(volume, tmp_path, 0.2, how, ("o", "orphans", mnt, 10**7))
    assert sorted(os.listdir(new)) == ["alias", "keep"]
    assert (new / "keep").read_bytes() == KEEP
    # Writes through a descriptor of a file that lost one of its two names stay.
    check_single_writer((new / "alias").read_bytes(), 7, (acks.last + 1) * RECORD, RECORD)
    # The names are free again, and all of it survives a clean remount.
    (new / "orphan").write_bytes(b"again")
    (new / "odir").mkdir()
    (new / "half").write_bytes(b"half")
    alias = (new / "alias").read_bytes()
    new = volume.remount()
    assert sorted(os.listdir(new)) == ["alias", "half", "keep", "odir", "orphan"]
    assert (new / "orphan").read_bytes() == b"again"
    assert (new / "alias").read_bytes() == alias
    assert (new / "alias").stat().st_nlink == 1


# -- 4b. several processes at once, then fsck -------------------------------------------------


def _crash_mixed(volume, mnt: Path, tmp: Path, seeds: tuple[int, ...], delay: float, how: str):
    """Metadata writers (each in a directory of its own) and a streaming writer at once."""
    specs = []
    for i, seed in enumerate(seeds):
        sub = mnt / f"w{i}"
        sub.mkdir()
        os.chmod(sub, 0o755)
        specs.append((f"m{i}", "meta", sub, seed, 10**7))
    specs.append(("s", "stream", mnt / "stream", 0, "fsync16", 10**7))
    acks, new = crash_during(volume, tmp, delay, how, *specs)
    for i, seed in enumerate(seeds):
        check_metadata(new / f"w{i}", seed, acks[i].last)
    mode = StreamMode.parse("fsync16")
    check_single_writer((new / "stream").read_bytes(), 0, acks[-1].last, mode.write_size, None)
    volume.unmount()
    done = volfsd("fsck", volume.name, root=volume.root, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(("seeds", "delay", "how"), [((11, 12, 13), 0.4, "kill"),
                                                     ((21, 22, 23), 0.7, "crash")])  # fmt: skip
def test_several_writers_killed_then_fsck(volume, mnt, tmp_path, seeds, delay, how):
    _crash_mixed(volume, mnt, tmp_path, seeds, _jitter(delay, seeds), how)


@pytest.mark.slow
@pytest.mark.parametrize("case", range(30))
def test_several_writers_killed_then_fsck_many(volume, mnt, tmp_path, case):
    rng = random.Random(f"mixed{case}")
    seeds = tuple(rng.randrange(1000, 9999) for _ in range(3))
    _crash_mixed(volume, mnt, tmp_path, seeds, rng.uniform(0.05, 3.0), rng.choice(HOW))


# -- 5. many crashes of one volume ---------------------------------------------------------------


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _crash_cycles(volume, tmp: Path, cycles: int, seed: int, record_property) -> None:
    """Crash one volume again and again with work in between; nothing acknowledged may go.

    The log starts a new segment every 256 KiB, so crashes land around segment changes, and
    clean remounts now and then checkpoint and drop segments that hold nothing live.
    """
    rng = random.Random(seed)
    use_segment_size(volume, 256 * 1024)
    path = volume.mount()
    known: dict[str, str] = {}  # file name -> sha256 of the content it must keep
    xattrs: dict[str, bytes] = {}
    gone: set[str] = set()
    written = 0
    sizes = []

    def verify(where: Path) -> None:
        for name, digest in known.items():
            assert _digest(where / name) == digest, f"{name} changed after a crash"
        for name, value in xattrs.items():
            assert os.getxattr(where / name, "user.cycle") == value
        for name in gone:
            assert not os.path.lexists(where / name), f"{name} came back"
        assert set(os.listdir(where)) == set(known)

    for cycle in range(cycles):
        verify(path)
        # Work by the test itself: every call returns before the crash.
        note = f"note{cycle}"
        (path / "tmp").write_bytes(payload(note, 3000 + cycle))
        os.rename(path / "tmp", path / note)
        os.setxattr(path / note, "user.cycle", str(cycle).encode())
        known[note] = hashlib.sha256(payload(note, 3000 + cycle)).hexdigest()
        xattrs[note] = str(cycle).encode()
        written += 3000 + cycle
        old = sorted(n for n in known if n.startswith("data"))
        if len(old) > 3 and rng.random() < 0.5:
            victim = rng.choice(old)
            os.unlink(path / victim)
            del known[victim]
            gone.add(victim)
        # A writer killed along with the server.
        name = f"data{cycle}"
        mode = ["plain", "ring37", "fsync16", "append", "batch48"][cycle % 5]
        delay = rng.uniform(0.05, 0.4)
        spec = (name, "stream", path / name, cycle, mode, 10**7)
        (acks,), path = crash_during(volume, tmp, delay, HOW[cycle % 2], spec)
        data = (path / name).read_bytes()
        parsed = StreamMode.parse(mode)
        if parsed.append:
            check_appends(data, {cycle: acks.last})
        else:
            check_single_writer(data, cycle, acks.last, parsed.write_size, parsed.slots)
        known[name] = hashlib.sha256(data).hexdigest()
        written += acks.last + parsed.write_size
        if cycle % 4 == 1:  # a clean remount now and then: checkpoint, drop dead segments
            path = volume.remount()
        if cycle % 3 == 2:  # crash again straight after a recovery, before any new work
            verify(path)
            path = bring_down(volume, HOW[cycle % 2])
        sizes.append(store_bytes(volume.store))
    verify(path)
    path = volume.remount()
    verify(path)
    sizes.append(store_bytes(volume.store))
    record_property("store_bytes_per_cycle", sizes)
    record_property("bytes_written", written)
    print(f"store bytes per cycle: {sizes}; bytes written: {written}")
    # Not a space-efficiency target: just that recovery does not duplicate or leak the log.
    assert max(sizes) <= 2 * written + 16 * 1024 * 1024, (sizes, written)


def test_repeated_kill_and_remount(volume, tmp_path, record_property):
    _crash_cycles(volume, tmp_path, 6, 7, record_property)


@pytest.mark.slow
def test_repeated_kill_and_remount_many(volume, tmp_path, record_property):
    _crash_cycles(volume, tmp_path, 80, 8, record_property)


# -- 6. a crash during recovery -----------------------------------------------------------------


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as st:
            return st.read().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _next_worker(volume, previous: int, timeout: float = 60) -> int:
    """The pid of the live worker that holds the volume's lock, once that is not *previous*."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, IndexError, ValueError):
            pid = int((volume.store / "lock").read_text().split()[0])
            if pid != previous and _running(pid):
                return pid
        time.sleep(0.0005)
    pytest.fail("the daemon started no new worker for the volume")


def _crash_recovery(volume, delays: list[float], record_property) -> None:
    """SIGKILL each worker the daemon starts while it may still replay a long log.

    Whether a kill lands during the replay or after it, the volume must come back whole.
    """
    mnt = volume.mount()
    batch = 48
    records = 200 * batch
    fd = os.open(mnt / "big", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for seq in range(0, records, batch):
            chunk = b"".join(record(5, s) for s in range(seq, seq + batch))
            assert os.pwrite(fd, chunk, seq * RECORD) == len(chunk)
    finally:
        os.close(fd)
    (mnt / "small").write_bytes(b"small")
    worker = volume.pid
    os.kill(worker, signal.SIGKILL)  # no checkpoint: each new worker replays all of it
    killed = []
    for delay in delays:
        worker = _next_worker(volume, worker)
        time.sleep(delay)
        os.kill(worker, signal.SIGKILL)
        killed.append(worker)
    volume.pid = _next_worker(volume, worker)
    _wait_served(mnt)
    served = volume.log_file.read_text(errors="replace")
    early = sum(f"(pid {pid})" not in served for pid in killed)
    record_property("workers_killed_before_serving", early)
    print(f"{early} of {len(killed)} workers were killed before they served")
    assert (mnt / "big").read_bytes() == expected_stream(5, records - 1)
    assert (mnt / "small").read_bytes() == b"small"
    new = volume.remount()
    assert sorted(os.listdir(new)) == ["big", "small"]
    assert (new / "big").stat().st_size == records * RECORD


@pytest.mark.expect_log(
    r"its worker exited \(pid \d+, ", "restart failed: the mount worker exited early"
)
def test_kill_during_recovery(volume, record_property):
    _crash_recovery(volume, [0.0, 0.1], record_property)


@pytest.mark.expect_log(
    r"its worker exited \(pid \d+, ", "restart failed: the mount worker exited early"
)
@pytest.mark.slow
def test_kill_during_recovery_many(volume, record_property):
    delays = [0.0, 0.0, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3]
    _crash_recovery(volume, delays, record_property)


# -- 7. a crash while the log is compacted ------------------------------------------------------


def _crash_compaction(volume, tmp: Path, delay: float, how: str) -> None:
    """Crash while the worker relocates live data out of segments full of garbage.

    Small segments, and a log of mostly overwritten data with live pieces in every segment,
    make the housekeeping compact segment after segment (each ending with a checkpoint).
    """
    use_segment_size(volume, 256 * 1024)
    mnt = volume.mount()
    piece, rounds = 16 * 1024, 600
    junk = os.open(mnt / "junk", os.O_WRONLY | os.O_CREAT, 0o644)
    keep = os.open(mnt / "keep", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for i in range(rounds):
            os.pwrite(junk, payload(f"junk{i}", 128 * 1024), 0)
            os.pwrite(keep, payload(f"keep{i}", piece), i * piece)
    finally:
        os.close(junk)
        os.close(keep)
    spec = ("w", "stream", mnt / "ring", 0, "ring37", 10**7)
    (acks,), new = crash_during(volume, tmp, delay, how, spec)
    want_keep = b"".join(payload(f"keep{i}", piece) for i in range(rounds))
    for clean_remount in (False, True):
        if clean_remount:
            new = volume.remount()
        assert (new / "junk").read_bytes() == payload(f"junk{rounds - 1}", 128 * 1024)
        assert (new / "keep").read_bytes() == want_keep
        check_single_writer((new / "ring").read_bytes(), 0, acks.last, RECORD, 37)
    compacted = volume.log_file.read_text(errors="replace").count("compacting segment")
    print(f"{compacted} segments compacted")


@pytest.mark.parametrize(("delay", "how"), [(1.0, "kill")])
def test_crash_during_compaction(volume, tmp_path, delay, how):
    _crash_compaction(volume, tmp_path, delay, how)


@pytest.mark.slow
@pytest.mark.parametrize("case", range(10))
def test_crash_during_compaction_many(volume, tmp_path, case):
    rng = random.Random(case)
    _crash_compaction(volume, tmp_path, rng.uniform(0.5, 4.0), rng.choice(HOW))


# -- 8. a crash that tears the store's last write ----------------------------------------------


@pytest.mark.parametrize("content", ["zeros", "log-like"])
def test_torn_last_write_is_dropped(volume, mnt, content):
    """SIGKILL in the middle of the worker's last pwritev leaves a prefix of that frame.

    Replay must drop that prefix whatever the lost write held, also bytes that look like
    volfs's own log (a copy of a store, a disk image), and keep what was acknowledged before.
    """
    (mnt / "before").write_bytes(b"acknowledged")
    start = b"\xa5" * 64
    if content == "log-like":  # a well-formed frame, as in any copy of a volfs segment
        inner = b"".join(frame.encode([[records.UNLINK, 1, b"before"]]))
    else:
        inner = bytes(32)
    (mnt / "torn").write_bytes(start + inner + bytes(8192))
    path = volume.crash()
    seg = max(volume.store.glob("seg-*.log"))
    raw = seg.read_bytes()
    os.truncate(seg, raw.rindex(start) + len(start) + len(inner) + 100)
    new = volume.mount(path)
    assert (new / "before").read_bytes() == b"acknowledged"
    assert (new / "torn").read_bytes() == b""  # created; the write was cut short, so dropped


if __name__ == "__main__":
    sys.exit(_writer_main(sys.argv[1:]))
