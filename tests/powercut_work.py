"""A random workload on a volume through the store API, with the state it must leave after each
operation: what the power-cut tests compare a recovered volume with.

The operations are the ones the FUSE layer makes (`volfs.fsops`), checked against the same
POSIX rules first, plus the housekeeping a worker does (sync, checkpoint, compaction, usage) and
restarts: a SIGKILLed worker (the volume closed without a checkpoint and opened again: the page
cache keeps everything) or a clean one.  File contents are modelled independently of the store;
names, attributes and link counts are taken from the volume's own state after each operation.
"""

from __future__ import annotations

import hashlib
import random
import stat
from collections.abc import Callable

from powercut_disk import Recorder

from volfs.store.root import StoreRoot
from volfs.store.state import ROOT_INO, Inode
from volfs.store.volume import Volume

#: The fields of each entry of a picture.
FIELDS = (
    "path",
    "ino",
    "mode",
    "uid",
    "gid",
    "rdev",
    "size",
    "atime",
    "mtime",
    "ctime",
    "nlink",
    "target",
    "xattrs",
    "content",
)
#: A volume as users see it: one entry of FIELDS per name, sorted by path.
Picture = tuple[tuple, ...]


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def picture(volume: Volume, digest_of: Callable[[Inode], bytes] | None = None) -> Picture:
    """Everything a user can see in *volume* below its root, in a comparable form."""
    if digest_of is None:

        def digest_of(inode: Inode) -> bytes:
            return digest(volume.read(inode, 0, inode.size))

    out = []
    pending = [(ROOT_INO, b"")]
    while pending:
        ino, prefix = pending.pop()
        for name, child_ino in volume.inodes[ino].entries.items():
            child = volume.inodes[child_ino]
            path = prefix + b"/" + name
            out.append(
                (
                    path,
                    child.ino,
                    child.mode,
                    child.uid,
                    child.gid,
                    child.rdev,
                    child.size,
                    child.atime_ns,
                    child.mtime_ns,
                    child.ctime_ns,
                    child.nlink,
                    child.target,
                    tuple(sorted((child.xattrs or {}).items())),
                    digest_of(child) if child.extents is not None else None,
                )
            )
            if child.entries is not None:
                pending.append((child_ino, path))
    return tuple(sorted(out))


def difference(got: Picture, want: Picture, limit: int = 8) -> str:
    """The paths on which two pictures differ, for failure messages."""
    a = {e[0]: e for e in got}
    b = {e[0]: e for e in want}
    lines = []
    for path in sorted(a.keys() | b.keys()):
        if path not in a:
            lines.append(f"  {path!r} missing")
        elif path not in b:
            lines.append(f"  {path!r} should not be there")
        elif a[path] != b[path]:
            fields = [f for f, x, y in zip(FIELDS, a[path], b[path], strict=True) if x != y]
            lines.append(f"  {path!r} differs in {', '.join(fields)}")
    if len(lines) > limit:
        lines[limit:] = [f"  ... and {len(lines) - limit} more"]
    return "\n".join(lines)


class Work:
    """Random operations on *volume*; ``pictures[i]`` is the state after the i-th change.

    *contents* models every regular file's bytes by inode number.  The recorder is told where
    each change begins (``begin``) and which state is current (``state``), so a power cut can be
    matched with the states it may legitimately leave.
    """

    def __init__(
        self,
        rec: Recorder,
        store: StoreRoot,
        name: str,
        volume: Volume,
        rng: random.Random,
        contents: dict[int, bytes],
        tag: bytes = b"",
    ) -> None:
        self.rec = rec
        self.store = store
        self.name = name
        self.volume = volume
        self.rng = rng
        self.contents = contents
        self.tag = tag
        self._digests: dict[int, bytes] = {}
        self._serial = 0
        self.clock = 1_700_000_000_000_000_000 + rng.randrange(10**15)
        self.pictures: list[Picture] = [self.picture()]
        self.restarts = 0
        self.checkpoints = 0
        self.compactions = 0
        rec.state = 0

    # -- the model ----------------------------------------------------------------------------

    def _digest(self, inode: Inode) -> bytes:
        value = self._digests.get(inode.ino)
        if value is None:
            value = self._digests[inode.ino] = digest(self.contents[inode.ino])
        return value

    def picture(self) -> Picture:
        return picture(self.volume, self._digest)

    def _set_content(self, ino: int, data: bytes) -> None:
        self.contents[ino] = data
        self._digests.pop(ino, None)

    def _now(self) -> int:
        self.clock += self.rng.randrange(1, 10**6)
        return self.clock

    def _name(self, kind: bytes) -> bytes:
        self._serial += 1
        return b"%s%s%d" % (self.tag, kind, self._serial)

    def _entries(self) -> list[tuple[Inode, bytes, Inode]]:
        """(parent, name, child) for every name in the volume."""
        inodes = self.volume.inodes
        out = []
        pending = [inodes[ROOT_INO]]
        while pending:
            directory = pending.pop()
            for name, ino in directory.entries.items():
                child = inodes[ino]
                out.append((directory, name, child))
                if child.entries is not None:
                    pending.append(child)
        return out

    def _dirs(self) -> list[Inode]:
        return [self.volume.inodes[ROOT_INO]] + [
            c for _, _, c in self._entries() if c.entries is not None
        ]

    def _files(self) -> list[Inode]:
        seen = {}
        for _, _, child in self._entries():
            if child.extents is not None:
                seen[child.ino] = child
        return list(seen.values())

    def _is_ancestor(self, ancestor: Inode, inode: Inode) -> bool:
        ino = inode.ino
        while True:
            if ino == ancestor.ino:
                return True
            if ino == ROOT_INO:
                return False
            ino = self.volume.inodes[ino].parent

    def _change(self, apply: Callable[[], None]) -> None:
        """Run one operation that changes what users see, and note the state it leads to."""
        state = len(self.pictures)
        self.rec.begin(state)
        apply()
        self.pictures.append(self.picture())
        self.rec.state = state

    # -- operations that change the tree ---------------------------------------------------------

    def create(self) -> None:
        parent = self.rng.choice(self._dirs())
        name = self._name(b"f")
        inode = self.volume.new_inode(stat.S_IFREG | 0o644, 0, 0, 0, self._now())

        def apply():
            self.volume.create(parent, name, inode, self._now())
            self._set_content(inode.ino, b"")

        self._change(apply)

    def mkdir(self) -> None:
        dirs = self._dirs()
        if len(dirs) > 6:
            return self.create()
        parent = self.rng.choice(dirs)
        inode = self.volume.new_inode(stat.S_IFDIR | 0o755, 0, 0, 0, self._now())
        self._change(lambda: self.volume.create(parent, self._name(b"d"), inode, self._now()))

    def symlink(self) -> None:
        parent = self.rng.choice(self._dirs())
        inode = self.volume.new_inode(stat.S_IFLNK | 0o777, 0, 0, 0, self._now())
        inode.target = b"../target-%d" % self.rng.randrange(10**6)
        inode.size = len(inode.target)
        self._change(lambda: self.volume.create(parent, self._name(b"l"), inode, self._now()))

    def write(self) -> None:
        files = self._files()
        if not files:
            return self.create()
        inode = self.rng.choice(files)
        old = self.contents[inode.ino]
        rng = self.rng
        offset = rng.choice(
            [0, len(old), rng.randrange(len(old) + 1), rng.randrange(len(old) + 70_000)]
        )
        offset = min(offset, 400_000)
        length = rng.choice(
            [rng.randrange(1, 600), rng.randrange(1, 5000), 4096, rng.randrange(5000, 70_000)]
            + [rng.randrange(64 * 1024, 200_000)] * (rng.random() < 0.3)
        )
        data = rng.randbytes(length)
        new = bytearray(old)
        if offset > len(new):
            new.extend(bytes(offset - len(new)))
        new[offset : offset + length] = data

        def apply():
            self.volume.write(inode, offset, data, self._now())
            self._set_content(inode.ino, bytes(new))

        self._change(apply)

    def rewrite(self) -> None:
        """Write a file over whole: its old data becomes garbage for compaction."""
        files = self._files()
        if not files:
            return self.create()
        inode = self.rng.choice(files)
        data = self.rng.randbytes(max(1, len(self.contents[inode.ino])))
        new = data + self.contents[inode.ino][len(data) :]

        def apply():
            self.volume.write(inode, 0, data, self._now())
            self._set_content(inode.ino, new)

        self._change(apply)

    def truncate(self) -> None:
        files = self._files()
        if not files:
            return self.create()
        inode = self.rng.choice(files)
        old = self.contents[inode.ino]
        size = self.rng.choice([0, len(old) // 2, self.rng.randrange(len(old) + 10_000)])
        new = old[:size] + bytes(max(0, size - len(old)))

        def apply():
            now = self._now()
            self.volume.set_attrs(inode, size=size, mtime_ns=now, ctime_ns=now)
            self._set_content(inode.ino, new)

        self._change(apply)

    def set_attrs(self) -> None:
        entries = self._entries()
        if not entries:
            return self.create()
        inode = self.rng.choice(entries)[2]
        if inode.target is not None:
            return self.create()
        if self.rng.random() < 0.5:
            mode = (inode.mode & ~0o7777) | self.rng.choice([0o600, 0o640, 0o755, 0o4711])
            self._change(lambda: self.volume.set_attrs(inode, mode=mode, ctime_ns=self._now()))
        else:
            atime, mtime = self._now(), self.rng.randrange(10**18)
            self._change(
                lambda: self.volume.set_attrs(
                    inode, atime_ns=atime, mtime_ns=mtime, ctime_ns=self._now()
                )
            )

    def xattr(self) -> None:
        entries = [e for e in self._entries() if e[2].target is None]
        if not entries:
            return self.create()
        inode = self.rng.choice(entries)[2]
        name = self.rng.choice([b"user.a", b"user.b", b"user.c"])
        value = None if self.rng.random() < 0.3 else self.rng.randbytes(self.rng.randrange(50))
        self._change(lambda: self.volume.set_xattr(inode, name, value, self._now()))

    def link(self) -> None:
        files = self._files()
        if not files:
            return self.create()
        inode = self.rng.choice(files)
        parent = self.rng.choice(self._dirs())
        name = self._name(b"h")
        self._change(lambda: self.volume.link(inode, parent, name, self._now()))

    def unlink(self) -> None:
        entries = [e for e in self._entries() if e[2].entries is None]
        if not entries:
            return self.create()
        parent, name, child = self.rng.choice(entries)
        self._change(lambda: self.volume.unlink(parent, name, child, self._now()))

    def rmdir(self) -> None:
        empty = [e for e in self._entries() if e[2].entries is not None and not len(e[2].entries)]
        if not empty:
            return self.mkdir()
        parent, name, child = self.rng.choice(empty)
        self._change(lambda: self.volume.unlink(parent, name, child, self._now()))

    def rename(self) -> None:
        entries = self._entries()
        if not entries:
            return self.create()
        old_parent, old_name, moved = self.rng.choice(entries)
        if self.rng.random() < 0.4:  # onto an existing name
            new_parent, new_name, target = self.rng.choice(entries)
        else:
            new_parent, new_name, target = self.rng.choice(self._dirs()), self._name(b"r"), None
        if moved.entries is not None and self._is_ancestor(moved, new_parent):
            return None
        if target is not None:
            if target is moved:
                return None
            if moved.entries is not None and (target.entries is None or len(target.entries)):
                return None
            if moved.entries is None and target.entries is not None:
                return None

        def apply():
            now = self._now()
            self.volume.rename(old_parent, old_name, new_parent, new_name, target, now)

        self._change(apply)

    def exchange(self) -> None:
        entries = self._entries()
        if len(entries) < 2:
            return self.create()
        (pa, na, a), (pb, nb, b) = self.rng.sample(entries, 2)
        if a is b:
            return None
        for node, other_parent in ((a, pb), (b, pa)):
            if node.entries is not None and self._is_ancestor(node, other_parent):
                return None
        self._change(lambda: self.volume.exchange(pa, na, pb, nb, self._now()))

    # -- housekeeping and restarts: the tree stays as it is --------------------------------------

    def sync(self) -> None:
        self.volume.sync()

    def checkpoint(self) -> None:
        self.volume.checkpoint()
        self.checkpoints += 1

    def compact(self) -> None:
        """Compact the sealed segment with the least live data, as the worker does (`_compact`)
        once garbage outweighs live data: whether it is due is not what is tested here."""
        volume = self.volume
        sizes = volume.log.sizes()
        sealed = [s for s in sizes if s != volume.log.head.seg and sizes[s]]
        if not sealed:
            return
        seg = min(sealed, key=lambda s: volume.live.get(s, 0) / sizes[s])
        self.rec.add("note", "compaction begins")
        for ino, start, length in volume.live_ranges()[seg]:
            volume.relocate(ino, start, length, seg)
        volume.checkpoint()
        self.rec.add("note", "compaction ends")
        self.compactions += 1

    def save_usage(self) -> None:
        self.volume.save_usage()

    def restart(self, clean: bool = False) -> None:
        """The worker ends (SIGKILL unless *clean*) and a new one opens the volume."""
        self.volume.close(checkpoint=clean)
        self.volume = self.store.open_volume(self.name, create=False)
        self.restarts += 1
        assert self.picture() == self.pictures[-1], "a restart changed the volume"
        assert picture(self.volume) == self.pictures[-1], "file contents differ from the model"

    def kill(self) -> None:
        self.restart(clean=False)

    def clean_restart(self) -> None:
        self.restart(clean=True)

    def stats(self) -> str:
        return (
            f"{len(self.pictures) - 1} changes, {self.checkpoints} checkpoints, "
            f"{self.compactions} compactions, {self.restarts} restarts"
        )

    STEPS = {
        "write": 30,
        "rewrite": 5,
        "create": 9,
        "truncate": 4,
        "set_attrs": 3,
        "xattr": 4,
        "link": 3,
        "unlink": 6,
        "mkdir": 3,
        "rmdir": 2,
        "symlink": 2,
        "rename": 7,
        "exchange": 2,
        "sync": 12,
        "checkpoint": 3,
        "compact": 3,
        "save_usage": 2,
        "kill": 3,
        "clean_restart": 1,
    }

    def run(self, steps: int, weights: dict[str, int] | None = None) -> None:
        weights = weights or self.STEPS
        names = list(weights)
        chosen = self.rng.choices(names, [weights[n] for n in names], k=steps)
        for name in chosen:
            getattr(self, name)()
