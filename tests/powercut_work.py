"""A random workload on a volume through the FUSE layer's rules, with the state it must leave
after each operation: what the power-cut tests compare a recovered volume with.

The operations are the FUSE layer's own steps (`volfs.posix.PosixRules`, run on the local
model's view as `VolumeOperations` runs them), so the same POSIX rules decide what is refused
(a refused operation writes nothing and leads to no new state), plus the housekeeping a worker
does (sync, checkpoint, compaction, usage) and restarts: a SIGKILLed worker (the volume closed
without a checkpoint and opened again: the page cache keeps everything) or a clean one.  File
contents are modelled independently of the store; names, attributes and link counts are taken
from the volume's own state after each operation.
"""

from __future__ import annotations

import hashlib
import random
import stat
from collections.abc import Callable

from powercut_disk import Recorder
from pyfuse3 import FUSEError

from volfs.localmodel import LocalModel
from volfs.model import Node, VolumeView
from volfs.posix import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, RENAME_EXCHANGE, PosixRules
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
        self.view = LocalModel(volume).view
        self.rng = rng
        self.contents = contents
        self.tag = tag
        self._digests: dict[int, bytes] = {}
        self._serial = 0
        self.clock = 1_700_000_000_000_000_000 + rng.randrange(10**15)
        self.rules = PosixRules(clock=self._now)
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

    def _change(self, step: Callable[[VolumeView], object]) -> None:
        """Run one operation that changes what users see, and note the state it leads to.

        The rules may refuse it: then it wrote nothing, and no state follows it."""
        state = len(self.pictures)
        self.rec.begin(state)
        try:
            step(self.view)  # as the local model runs a step: at once
        except FUSEError:
            assert self.rec.events[-1] == ("begin", state), "a refused operation wrote"
            self.rec.events.pop()
            return
        self.pictures.append(self.picture())
        self.rec.state = state

    # -- operations that change the tree ---------------------------------------------------------

    def _new_file(self, view: VolumeView, parent: Node, name: bytes) -> None:
        node = self.rules.new(view, parent.ino, name, stat.S_IFREG | 0o644, 0, 0)
        self._set_content(node.ino, b"")

    def create(self) -> None:
        parent = self.rng.choice(self._dirs())
        name = self._name(b"f")
        self._change(lambda view: self._new_file(view, parent, name))

    def mkdir(self) -> None:
        dirs = self._dirs()
        if len(dirs) > 6:
            return self.create()
        parent = self.rng.choice(dirs)
        name = self._name(b"d")
        self._change(lambda view: self.rules.mkdir(view, parent.ino, name, 0o755, 0, 0, 0))

    def symlink(self) -> None:
        parent = self.rng.choice(self._dirs())
        target = b"../target-%d" % self.rng.randrange(10**6)
        name = self._name(b"l")
        self._change(lambda view: self.rules.symlink(view, parent.ino, name, target, 0, 0))

    def _write(self, view: VolumeView, inode: Inode, offset: int, data: bytes, new: bytes) -> None:
        self.rules.write(view, inode, offset, data)
        self._set_content(inode.ino, new)

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
        self._change(lambda view: self._write(view, inode, offset, data, bytes(new)))

    def rewrite(self) -> None:
        """Write a file over whole: its old data becomes garbage for compaction."""
        files = self._files()
        if not files:
            return self.create()
        inode = self.rng.choice(files)
        data = self.rng.randbytes(max(1, len(self.contents[inode.ino])))
        new = data + self.contents[inode.ino][len(data) :]
        self._change(lambda view: self._write(view, inode, 0, data, new))

    def _truncate(self, view: VolumeView, inode: Inode, size: int, new: bytes) -> None:
        self.rules.setattr(view, inode.ino, size=size)  # mtime and ctime: now
        self._set_content(inode.ino, new)

    def truncate(self) -> None:
        files = self._files()
        if not files:
            return self.create()
        inode = self.rng.choice(files)
        old = self.contents[inode.ino]
        size = self.rng.choice([0, len(old) // 2, self.rng.randrange(len(old) + 10_000)])
        new = old[:size] + bytes(max(0, size - len(old)))
        self._change(lambda view: self._truncate(view, inode, size, new))

    def _fallocate(
        self, view: VolumeView, inode: Inode, mode: int, offset: int, length: int, new: bytes
    ) -> None:
        self.rules.fallocate(view, inode, mode, offset, length)
        self._set_content(inode.ino, new)

    def punch(self) -> None:
        """A hole punched (fallocate PUNCH_HOLE|KEEP_SIZE): one frame of three records."""
        files = [f for f in self._files() if self.contents[f.ino]]
        if not files:
            return self.write()
        inode = self.rng.choice(files)
        old = self.contents[inode.ino]
        offset = self.rng.randrange(len(old))
        length = self.rng.choice([self.rng.randrange(1, 5000), self.rng.randrange(1, 200_000)])
        end = min(offset + length, len(old))
        new = old[:offset] + bytes(end - offset) + old[end:]
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        self._change(lambda view: self._fallocate(view, inode, mode, offset, length, new))

    def allocate(self) -> None:
        """fallocate mode 0 or KEEP_SIZE: frames of zeros, the size first."""
        files = self._files()
        if not files:
            return self.create()
        inode = self.rng.choice(files)
        old = self.contents[inode.ino]
        offset = self.rng.randrange(len(old) + 70_000)
        length = self.rng.randrange(1, 150_000)
        mode = FALLOC_FL_KEEP_SIZE if self.rng.random() < 0.3 else 0
        new = old if mode else old + bytes(max(0, offset + length - len(old)))
        self._change(lambda view: self._fallocate(view, inode, mode, offset, length, new))

    def set_attrs(self) -> None:
        entries = self._entries()
        if not entries:
            return self.create()
        inode = self.rng.choice(entries)[2]
        if inode.target is not None:
            return self.create()
        if self.rng.random() < 0.5:
            mode = self.rng.choice([0o600, 0o640, 0o755, 0o4711])
            self._change(lambda view: self.rules.setattr(view, inode.ino, mode=mode))
        else:
            atime, mtime = self._now(), self.rng.randrange(10**18)
            self._change(
                lambda view: self.rules.setattr(view, inode.ino, atime_ns=atime, mtime_ns=mtime)
            )

    def xattr(self) -> None:
        entries = [e for e in self._entries() if e[2].target is None]
        if not entries:
            return self.create()
        ino = self.rng.choice(entries)[2].ino
        name = self.rng.choice([b"user.a", b"user.b", b"user.c"])
        if self.rng.random() < 0.3:
            self._change(lambda view: self.rules.removexattr(view, ino, name, 0))
        else:
            value = self.rng.randbytes(self.rng.randrange(50))
            self._change(lambda view: self.rules.setxattr(view, ino, name, value, 0))

    def link(self) -> None:
        files = self._files()
        if not files:
            return self.create()
        ino = self.rng.choice(files).ino
        parent = self.rng.choice(self._dirs())
        name = self._name(b"h")
        self._change(lambda view: self.rules.link(view, ino, parent.ino, name))

    def unlink(self) -> None:
        entries = [e for e in self._entries() if e[2].entries is None]
        if not entries:
            return self.create()
        parent, name, _ = self.rng.choice(entries)
        self._change(lambda view: self.rules.unlink(view, parent.ino, name))

    def rmdir(self) -> None:
        empty = [e for e in self._entries() if e[2].entries is not None and not len(e[2].entries)]
        if not empty:
            return self.mkdir()
        parent, name, _ = self.rng.choice(empty)
        self._change(lambda view: self.rules.rmdir(view, parent.ino, name))

    def rename(self) -> None:
        """Onto a new name or an existing one: the rules refuse what POSIX does (a directory
        into itself, over a file or a full directory, a file over a directory)."""
        entries = self._entries()
        if not entries:
            return self.create()
        old_parent, old_name, _ = self.rng.choice(entries)
        if self.rng.random() < 0.4:  # onto an existing name
            new_parent, new_name, _ = self.rng.choice(entries)
        else:
            new_parent, new_name = self.rng.choice(self._dirs()), self._name(b"r")
        self._change(
            lambda view: self.rules.rename(
                view, old_parent.ino, old_name, new_parent.ino, new_name, 0
            )
        )

    def exchange(self) -> None:
        entries = self._entries()
        if len(entries) < 2:
            return self.create()
        (pa, na, _), (pb, nb, _) = self.rng.sample(entries, 2)
        self._change(lambda view: self.rules.rename(view, pa.ino, na, pb.ino, nb, RENAME_EXCHANGE))

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
        self.view = LocalModel(self.volume).view
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
