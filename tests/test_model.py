"""Model-based test: random file system operations on a volfs mount and on a native directory.

A hypothesis state machine applies the same operation to a fresh volfs volume and to a plain
directory on the host's own file system (the model), and requires the same outcome from both:
the same return value, or an OSError with the same errno.  After every step the two trees must
be equal: names, types, permission bits, owners, sizes, contents, symlink targets, which names
share an inode, link counts and user.* xattrs.  A "remount" step unmounts and mounts the volume
again at the same path; the tree must survive it unchanged, modification times (ns) included.

Paths are drawn from a tiny alphabet a few levels deep, mostly among the names that exist, so
that operations collide: renames over existing names, rmdir of non-empty directories, links onto
taken names.  Symlink targets are relative, and may lead out of the root (a link moved up by a
rename): each root sits at the bottom of its own chain of directories, named alike in both
(`twin_root`), so a link that leads out reaches a private twin place from each root, never one
place both write.  The one absolute target names a path under a directory that does not exist.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from volfs import mounts
from volfs.store.root import StoreRoot

from conftest import Volume

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
MIB = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
_libc.renameat2.argtypes += [ctypes.c_uint]
_libc.renameat2.restype = ctypes.c_int


def renameat2(src: str, dst: str, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), src, None, dst)


# -- strategies -----------------------------------------------------------------------------

NAMES = ["a", "b", "c", "d"]
names = st.sampled_from(NAMES)
fresh = st.lists(names, min_size=1, max_size=3).map("/".join)


def _existing(machine: VolfsModel):
    found = machine.existing()
    return st.sampled_from(found) if found else fresh


def _file(machine: VolfsModel):
    found = machine.existing(kind=stat.S_IFREG)
    return st.sampled_from(found) if found else fresh


def _free(machine: VolfsModel):
    """A name not taken yet in a directory that exists in the model."""
    free = [
        f"{d}/{n}" if d else n
        for d in ["", *machine.existing(kind=stat.S_IFDIR)]
        for n in NAMES
        if not os.path.lexists(machine.model / d / n)
    ]
    return st.sampled_from(free) if free else fresh


#: Paths that exist in the model now, a free name in an existing directory, or anything.
existing_paths = st.runner().flatmap(_existing)
free_paths = st.runner().flatmap(_free)
paths = st.one_of(existing_paths, existing_paths, existing_paths, free_paths, fresh)
#: For operations on regular files: mostly one that exists.
file_paths = st.one_of(st.runner().flatmap(_file), st.runner().flatmap(_file), paths)
#: For the name an operation creates: mostly a free one, sometimes a taken one.
new_paths = st.one_of(free_paths, free_paths, existing_paths, fresh)
#: An absolute symlink target that stays absent: under a directory that does not exist, which
#: nothing the machine does can create (its names are a-d), so opening it with O_CREAT fails
#: alike for both trees.  A target that could be created would be ONE file on the host for both
#: trees: the model's O_CREAT|O_APPEND write through it made it, volfs's then wrote after it.
ABSENT_TARGET = "/nonexistent-volfs-model/a"
#: Symlink targets.  Those that climb out of the tree lead to each root's twin surroundings
#: (`twin_root`).
targets = st.one_of(
    fresh,
    st.builds("../{}".format, fresh),
    st.sampled_from([".", "..", "a/.", "../../b", ABSENT_TARGET]),
)
#: Offsets and sizes: small ones, block edges, and the edges of volfs's 1 MiB extent chunks
#: (a write of up to 300 KB at MIB - 3 straddles one), up to sparse files of a few MiB.
offsets = st.one_of(
    st.integers(0, 9000),
    st.sampled_from(
        [4095, 4096, 65535, 65536, 131073, MIB - 3, MIB, MIB + 1, 2 * MIB - 1000, 4 * MIB - 7]
    ),
)
sizes = st.one_of(
    st.integers(0, 9000), st.sampled_from([4096, 65536, MIB - 1, MIB, 2 * MIB + 1, 3 * MIB + 5])
)
blobs = st.one_of(
    st.binary(max_size=64),
    st.builds(
        lambda pattern, n: pattern * n, st.binary(min_size=1, max_size=5), st.integers(1, 60000)
    ),
)
file_modes = st.sampled_from([0o644, 0o600, 0o755, 0o000, 0o777])
dir_modes = st.sampled_from([0o755, 0o700, 0o777, 0o2755, 0o1777])
chmod_modes = st.sampled_from([0o644, 0o600, 0o755, 0o000, 0o4755, 0o2755, 0o2745, 0o1777, 0o7777])
#: Names Linux file systems refuse: a bare namespace (EINVAL), unknown namespaces (EOPNOTSUPP).
INVALID_XATTR_NAMES = ["user.", "foo.bar", "userx"]
valid_xattr_names = st.sampled_from(["user.a", "user.b", "user.long.name"])
xattr_names = st.one_of(
    valid_xattr_names, valid_xattr_names, valid_xattr_names, st.sampled_from(INVALID_XATTR_NAMES)
)
xattr_values = st.one_of(st.binary(max_size=40), st.just(b"v" * 1000))
#: ext4 (the model) keeps ns timestamps from 1901 to 2446, but drops the ns of a time in the
#: first or last second of that range; stay inside.
timestamps = st.one_of(
    st.integers(-(2**31 - 1) * 10**9, 2**33 * 10**9),
    st.sampled_from([0, 1, 999_999_999, 1_000_000_000, 1_700_000_000_123_456_789]),
)


# -- running one operation on both trees ----------------------------------------------------


def _put(path: str, data: bytes, offset: int = 0):
    def op(root):
        fd = os.open(os.path.join(root, path), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    return op


#: Every example starts from this tree (then adds random entries), so that the operations meet
#: files, directories, symlinks, hard links and xattrs from the first step on.
BASE_TREE = [
    lambda root: os.mkdir(os.path.join(root, "a")),
    lambda root: os.mkdir(os.path.join(root, "a/b")),
    lambda root: os.mkdir(os.path.join(root, "b")),
    lambda root: os.mkdir(os.path.join(root, "b/c"), 0o700),
    _put("a/b/c", bytes(range(256)) * 20),
    _put("a/c", b"hello"),
    _put("c", b"sparse", 2 * MIB + 3),
    lambda root: os.link(os.path.join(root, "a/c"), os.path.join(root, "b/a")),
    lambda root: os.symlink("b", os.path.join(root, "a/a")),
    lambda root: os.symlink("../c", os.path.join(root, "b/b")),
    lambda root: os.setxattr(os.path.join(root, "a/c"), "user.a", b"1"),
    lambda root: os.setxattr(os.path.join(root, "b"), "user.b", b""),
]


def outcome(fn, root: Path):
    """What *fn* did in the tree at *root*: ("ok", value) or ("error", errno name)."""
    try:
        return ("ok", fn(str(root)))
    except OSError as exc:
        return ("error", errno.errorcode.get(exc.errno, exc.errno))


def short(value, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


# -- where the two roots are ----------------------------------------------------------------

#: How many directories above each root belong to it alone.  A symlink's ".." climbs at most two
#: levels from where it is, and a link that leads out can only be reached, or made outside, by a
#: path through another such link, so leaving all of these takes a chain of links made for it.
PRIVATE_LEVELS = 4


def twin_root(top: Path) -> Path:
    """A new empty directory at the bottom of a chain of PRIVATE_LEVELS - 1 directories in *top*.

    The model's root and the mount point are each made so, in a *top* of their own, with the same
    names: a path that leads out of either root climbs into directories that look alike (same
    names, modes, link counts) and are not shared.  When the model root and the mount point were
    siblings, or merely at different depths, the model's write through a link leading out and
    volfs's landed in one file outside both, and a listing of ".." from the two roots differed.
    """
    root = top.joinpath(*["out"] * (PRIVATE_LEVELS - 1), "root")
    root.mkdir(parents=True)
    return root


# -- snapshots of whole trees ---------------------------------------------------------------


def snapshot(root: Path, with_mtime: bool = False) -> dict:
    """Everything the model compares about the tree at *root*, keyed by relative path."""
    nodes: dict[str, dict] = {}
    by_inode: dict[int, list[str]] = {}

    def walk(directory: str, rel: str) -> None:
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            key = f"{rel}{name}"
            st_ = os.lstat(path)
            kind = stat.S_IFMT(st_.st_mode)
            node = {
                "type": stat.filemode(kind)[0],
                "mode": oct(stat.S_IMODE(st_.st_mode)),
                "nlink": st_.st_nlink,
                "uid": st_.st_uid,
                "gid": st_.st_gid,
            }
            if with_mtime:
                node["mtime_ns"] = st_.st_mtime_ns
            if stat.S_ISREG(kind):
                node["size"] = st_.st_size
                with open(path, "rb") as f:
                    node["data"] = f.read()
            elif stat.S_ISLNK(kind):
                node["size"] = st_.st_size
                node["target"] = os.readlink(path)
            if not stat.S_ISLNK(kind):
                node["xattrs"] = {
                    x: os.getxattr(path, x, follow_symlinks=False)
                    for x in sorted(os.listxattr(path, follow_symlinks=False))
                    if x.startswith("user.")
                }
            nodes[key] = node
            by_inode.setdefault(st_.st_ino, []).append(key)
            if stat.S_ISDIR(kind):
                walk(path, f"{key}/")

    st_root = os.lstat(root)
    nodes["."] = {"mode": oct(stat.S_IMODE(st_root.st_mode)), "nlink": st_root.st_nlink}
    if with_mtime:
        nodes["."]["mtime_ns"] = st_root.st_mtime_ns
    walk(str(root), "")
    links = sorted(sorted(group) for group in by_inode.values() if len(group) > 1)
    return {"nodes": nodes, "hard links": links}


def first_difference(a: bytes, b: bytes) -> str:
    at = next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )
    return (
        f"lengths {len(a)} vs {len(b)}, first difference at offset {at}: "
        f"{a[at : at + 16]!r} vs {b[at : at + 16]!r}"
    )


def differences(got: dict, want: dict, labels: str = "volfs vs model") -> list[str]:
    """Readable differences between two snapshots."""
    first, second = labels.split(" vs ")
    found = []
    for key in sorted(set(got["nodes"]) | set(want["nodes"])):
        g, w = got["nodes"].get(key), want["nodes"].get(key)
        if g is None or w is None:
            found.append(f"{key}: {first} has {short(g)}, {second} has {short(w)}")
            continue
        for field in sorted(set(g) | set(w)):
            if g.get(field) == w.get(field):
                continue
            if field == "data":
                detail = first_difference(g[field], w[field])
            else:
                detail = f"{short(g.get(field))} vs {short(w.get(field))}"
            found.append(f"{key}: {field} differs ({labels}): {detail}")
    if got["hard links"] != want["hard links"]:
        found.append(f"hard links: {first} {got['hard links']}, {second} {want['hard links']}")
    return found


# -- the state machine ----------------------------------------------------------------------


class VolfsModel(RuleBasedStateMachine):
    """One example: a fresh volume and a fresh native directory under `base_dir`."""

    base_dir: Path  # set per test by `machine_for`
    max_remounts: int  # per example: a remount costs about half a second

    def __init__(self) -> None:
        super().__init__()
        self.work = Path(tempfile.mkdtemp(prefix="example-", dir=self.base_dir))
        # Twins: a symlink that leads out of the root (the base tree's "../c", once renamed to
        # the top) must reach different but alike places from the two roots.
        self.model = twin_root(self.work / "model")
        self.mount_point = twin_root(self.work / "volfs")
        self.volume = Volume(self.work / "store", "model", self.work)
        self.mnt: Path | None = None
        self.remounts = 0

    @initialize(
        entries=st.lists(st.tuples(fresh, st.booleans(), blobs), max_size=6),
        small_segments=st.booleans(),
    )
    def mount(self, entries, small_segments):
        """Mount a fresh volume; create the base tree and a few more entries in both trees.

        With *small_segments* the log rolls over to a new segment every 4 KiB, so that even
        these small trees spread over many segments, and checkpoints drop dead ones.
        """
        if small_segments:
            StoreRoot(self.volume.root).create_volume(self.volume.name, segment_size=4096)
        self.mnt = self.volume.mount(self.mount_point)
        # The roots themselves must agree on what the model compares: same mode and owner.
        os.chmod(self.model, stat.S_IMODE(os.stat(self.mnt).st_mode))
        for op in BASE_TREE:
            self.both(op)
        for path, is_dir, data in entries:
            parts = path.split("/")
            for depth in range(1, len(parts)):
                parent = "/".join(parts[:depth])
                if not os.path.lexists(self.model / parent):
                    self.both(lambda root, d=parent: os.mkdir(os.path.join(root, d)))
            if is_dir:
                self.both(lambda root, path=path: os.mkdir(os.path.join(root, path)))
            else:
                self.both(lambda root, path=path, data=data: Path(root, path).write_bytes(data))

    def teardown(self) -> None:
        try:
            if self.volume.path is not None and mounts.find_mount(self.volume.path) is not None:
                with contextlib.suppress(Exception):
                    self.volume.unmount()
        finally:
            try:
                self.volume.cleanup()
            finally:
                shutil.rmtree(self.work, ignore_errors=True)

    # -- helpers ------------------------------------------------------------------------

    def both(self, fn):
        """Run *fn* on the model and on volfs; their outcomes must be equal.  Returns it."""
        want = outcome(fn, self.model)
        got = outcome(fn, self.mnt)
        assert got == want, f"volfs: {short(got, 400)}\nmodel: {short(want, 400)}"
        return want

    def existing(self, kind: int | None = None) -> list[str]:
        """The paths in the model tree now (of file type *kind*, if given), sorted."""
        found = []
        for top, dirs, files in os.walk(self.model):  # symlinks to dirs come in dirs
            rel = os.path.relpath(top, self.model)
            prefix = "" if rel == "." else f"{rel}/"
            found += [f"{prefix}{name}" for name in dirs + files]
        if kind is not None:
            found = [p for p in found if stat.S_IFMT(os.lstat(self.model / p).st_mode) == kind]
        return sorted(found)

    def compare_trees(self) -> None:
        got, want = snapshot(self.mnt), snapshot(self.model)
        diffs = differences(got, want)
        assert not diffs, "trees differ:\n" + "\n".join(diffs)

    # -- files ----------------------------------------------------------------------------

    @rule(
        path=file_paths,
        offset=offsets,
        data=blobs,
        flags=st.sampled_from(
            [os.O_CREAT, os.O_CREAT | os.O_EXCL, os.O_CREAT | os.O_TRUNC, 0, os.O_TRUNC]
        ),
        mode=file_modes,
        seek=st.booleans(),
    )
    def write(self, path, offset, data, flags, mode, seek):
        def op(root):
            fd = os.open(os.path.join(root, path), os.O_WRONLY | flags, mode)
            try:
                if seek:
                    os.lseek(fd, offset, os.SEEK_SET)
                    done = os.write(fd, data)
                else:
                    done = os.pwrite(fd, data, offset)
                return done, os.fstat(fd).st_size
            finally:
                os.close(fd)

        self.both(op)

    @rule(path=file_paths, data=blobs, create=st.booleans(), pwrite_at=st.none() | offsets)
    def append(self, path, data, create, pwrite_at):
        """O_APPEND writes land at the end, also pwrite() at an offset (Linux semantics)."""

        def op(root):
            flags = os.O_WRONLY | os.O_APPEND | (os.O_CREAT if create else 0)
            fd = os.open(os.path.join(root, path), flags, 0o644)
            try:
                done = [os.write(fd, data)]
                if pwrite_at is not None:
                    done.append(os.pwrite(fd, data[::-1], pwrite_at))
                return done, os.fstat(fd).st_size, os.lseek(fd, 0, os.SEEK_CUR)
            finally:
                os.close(fd)

        self.both(op)

    @rule(path=file_paths, offset=offsets, size=sizes)
    def read(self, path, offset, size):
        def op(root):
            fd = os.open(os.path.join(root, path), os.O_RDONLY)
            try:
                return os.pread(fd, size, offset), os.fstat(fd).st_size
            finally:
                os.close(fd)

        self.both(op)

    @rule(path=file_paths, size=sizes, use_fd=st.booleans())
    def truncate(self, path, size, use_fd):
        def op(root):
            full = os.path.join(root, path)
            if not use_fd:
                return os.truncate(full, size)
            fd = os.open(full, os.O_WRONLY)
            try:
                os.ftruncate(fd, size)
                return os.fstat(fd).st_size
            finally:
                os.close(fd)

        self.both(op)

    @rule(
        path=file_paths,
        action=st.sampled_from(["unlink", "rename away", "rename over"]),
        other=paths,
        data=blobs,
        offset=offsets,
    )
    def write_open(self, path, action, other, data, offset):
        """An open file stays usable after its name is removed, moved or replaced."""

        def op(root):
            full, elsewhere = os.path.join(root, path), os.path.join(root, other)
            fd = os.open(full, os.O_RDWR)
            try:
                if action == "unlink":
                    os.unlink(full)
                elif action == "rename away":
                    os.rename(full, elsewhere)
                else:
                    os.rename(elsewhere, full)
                os.pwrite(fd, data, offset)
                return os.fstat(fd).st_nlink, os.pread(fd, len(data) + 10, offset)
            finally:
                os.close(fd)

        self.both(op)

    # -- names ----------------------------------------------------------------------------

    @rule(path=new_paths, mode=dir_modes)
    def mkdir(self, path, mode):
        self.both(lambda root: os.mkdir(os.path.join(root, path), mode))

    @rule(path=paths)
    def rmdir(self, path):
        self.both(lambda root: os.rmdir(os.path.join(root, path)))

    @rule(path=paths)
    def unlink(self, path):
        self.both(lambda root: os.unlink(os.path.join(root, path)))

    @rule(
        src=paths,
        dst=st.one_of(existing_paths, free_paths),
        flags=st.sampled_from([None, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]),
    )
    def rename(self, src, dst, flags):
        self._rename(src, dst, flags)

    @rule(
        src=paths,
        below=st.lists(names, min_size=1, max_size=2).map("/".join),
        flags=st.sampled_from([None, RENAME_NOREPLACE, RENAME_EXCHANGE]),
        reverse=st.booleans(),
    )
    def rename_nested(self, src, below, flags, reverse):
        """Renames between a path and one below it: into its own subdirectory, or up."""
        dst = f"{src}/{below}"
        self._rename(dst, src, flags) if reverse else self._rename(src, dst, flags)

    def _rename(self, src, dst, flags):
        def op(root):
            old, new = os.path.join(root, src), os.path.join(root, dst)
            if flags is None:
                return os.rename(old, new)
            return renameat2(old, new, flags)

        self.both(op)

    @rule(src=file_paths, dst=new_paths, follow=st.booleans())
    def link(self, src, dst, follow):
        self.both(
            lambda root: os.link(
                os.path.join(root, src), os.path.join(root, dst), follow_symlinks=follow
            )
        )

    @rule(to=targets, path=new_paths)
    def symlink(self, to, path):
        self.both(lambda root: os.symlink(to, os.path.join(root, path)))

    @rule(path=paths)
    def readlink(self, path):
        self.both(lambda root: os.readlink(os.path.join(root, path)))

    @rule(path=paths)
    def listdir(self, path):
        self.both(lambda root: sorted(os.listdir(os.path.join(root, path))))

    @rule(path=paths, follow=st.booleans())
    def stat(self, path, follow):
        def op(root):
            st_ = os.stat(os.path.join(root, path), follow_symlinks=follow)
            size = None if stat.S_ISDIR(st_.st_mode) else st_.st_size
            return oct(st_.st_mode), st_.st_nlink, size

        self.both(op)

    # -- attributes -----------------------------------------------------------------------

    @rule(path=paths, mode=chmod_modes)
    def chmod(self, path, mode):
        self.both(lambda root: os.chmod(os.path.join(root, path), mode))

    @rule(path=paths, atime=timestamps, mtime=timestamps, follow=st.booleans())
    def utime(self, path, atime, mtime, follow):
        def op(root):
            full = os.path.join(root, path)
            os.utime(full, ns=(atime, mtime), follow_symlinks=follow)
            return os.stat(full, follow_symlinks=follow).st_mtime_ns

        self.both(op)

    @rule(
        path=paths,
        name=xattr_names,
        value=xattr_values,
        flags=st.sampled_from([0, os.XATTR_CREATE, os.XATTR_REPLACE]),
        follow=st.booleans(),
    )
    def setxattr(self, path, name, value, flags, follow):
        self.both(
            lambda root: os.setxattr(
                os.path.join(root, path), name, value, flags, follow_symlinks=follow
            )
        )

    @rule(path=paths, name=xattr_names, follow=st.booleans())
    def getxattr(self, path, name, follow):
        self.both(lambda root: os.getxattr(os.path.join(root, path), name, follow_symlinks=follow))

    @rule(path=paths, name=xattr_names, follow=st.booleans())
    def removexattr(self, path, name, follow):
        self.both(
            lambda root: os.removexattr(os.path.join(root, path), name, follow_symlinks=follow)
        )

    @rule(path=paths, follow=st.booleans())
    def listxattr(self, path, follow):
        def op(root):
            found = os.listxattr(os.path.join(root, path), follow_symlinks=follow)
            return sorted(x for x in found if x.startswith("user."))

        self.both(op)

    # -- the volume as a whole ------------------------------------------------------------

    @precondition(lambda self: self.remounts < self.max_remounts)
    @rule()
    def remount(self):
        self.remounts += 1
        before = snapshot(self.mnt, with_mtime=True)
        # At the same path: what a link leading out of the root made stays in its surroundings.
        self.volume.unmount()
        self.mnt = self.volume.mount(self.mount_point)
        after = snapshot(self.mnt, with_mtime=True)
        diffs = differences(after, before, "after remount vs before")
        assert not diffs, "the tree changed across a remount:\n" + "\n".join(diffs)

    @invariant()
    def trees_match(self):
        if self.mnt is not None:
            self.compare_trees()


def machine_for(tmp_path: Path, max_remounts: int) -> type[VolfsModel]:
    return type("VolfsModel", (VolfsModel,), {"base_dir": tmp_path, "max_remounts": max_remounts})


def test_model(tmp_path: Path) -> None:
    run_state_machine_as_test(
        machine_for(tmp_path, max_remounts=1),
        settings=settings(
            max_examples=12,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        ),
    )


@pytest.mark.slow
def test_model_long(tmp_path: Path) -> None:
    run_state_machine_as_test(
        machine_for(tmp_path, max_remounts=4),
        settings=settings(
            max_examples=400,
            stateful_step_count=60,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        ),
    )


@pytest.mark.parametrize(
    "steps",
    [
        # The slow run's failure, shrunk: the model's append created the absolute target on the
        # host, and volfs's appended to that same file, so their sizes differed by one append.
        [("symlink", {"to": ABSENT_TARGET, "path": "d"})]
        + [("append", {"path": "d", "data": b"x", "create": True, "pwrite_at": None})] * 2,
        # Two levels out from the mount point was one level out from the model root.
        [
            ("symlink", {"to": "../b", "path": "d"}),
            ("append", {"path": "d", "data": b"x", "create": True, "pwrite_at": None}),
            ("unlink", {"path": "d"}),
            ("symlink", {"to": "../../b", "path": "d"}),
            ("append", {"path": "d", "data": b"x", "create": True, "pwrite_at": None}),
        ],
        # ".." from each root: the directory that holds it, named alike.
        [
            ("symlink", {"to": "..", "path": "d"}),
            ("listdir", {"path": "d"}),
            ("stat", {"path": "d", "follow": True}),
            ("mkdir", {"path": "d/a", "mode": 0o755}),
            ("listdir", {"path": "d"}),
        ],
    ],
    ids=["absolute target", "two levels out", "parent listing"],
)
def test_links_out_of_the_roots(tmp_path: Path, steps: list[tuple[str, dict]]) -> None:
    """Symlinks that lead out of the trees reach twin places from the model root and the mount
    point, never one file both write: the state machine's steps, run by hand (volfs was right)."""
    machine = machine_for(tmp_path, max_remounts=0)()
    try:
        machine.mount(entries=[], small_segments=False)
        for rule_name, arguments in steps:
            getattr(machine, rule_name)(**arguments)
            machine.trees_match()
    finally:
        machine.teardown()


def test_xattr_names_like_linux(mnt: Path, tmp_path: Path) -> None:
    """ext4, xfs and tmpfs refuse "user." (EINVAL) and unknown namespaces (EOPNOTSUPP)."""
    model = tmp_path / "native"
    model.mkdir()
    results = {}
    for root in (model, mnt):
        (root / "f").write_bytes(b"")
        results[root] = [
            outcome(lambda r, n=name: os.setxattr(os.path.join(r, "f"), n, b"x"), root)
            for name in INVALID_XATTR_NAMES
        ] + [outcome(lambda r: sorted(os.listxattr(os.path.join(r, "f"))), root)]
    assert results[mnt] == results[model]
