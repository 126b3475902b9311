"""Crash safety of a volume's history: every operation killed right after each call that writes.

The operations: a snapshot taken of a volume nobody serves (`history.take_unserved`) and of a
loaded one, as a worker takes it between two requests (`snapshots.take`), a snapshot removed,
a clone made, a volume rolled back.  Each runs in a forked child whose calls that change the
store (the `os` calls in `WRITING_CALLS`, and `journal.rename_noreplace`) are counted; the
child SIGKILLs itself right after the Nth (`run_killed`), for every N the operation reaches.
Only the child is patched: the test's own volfs calls run unchanged.  After each kill:

* ``volfsd fsck`` of every volume is clean, their snapshots included;
* every volume, snapshot and clone, loaded read-only, reads back exactly as before the
  operation or exactly as after it, all of them together (`store_picture`): never half;
* the next operation of the same kind sweeps whatever the killed one left hidden
  (``.taking-*``, ``.removing-*``, ``.cloning-*``), leaves no file that neither a whole
  operation nor none would have left, and every volume then opens as a mount opens it and
  reads back as it did.

A SIGKILL keeps what the page cache holds, so this is about the order of the steps.  Power cuts
(`test_an_operation_that_returned_survives_a_power_cut`): when an operation returns, all it
wrote is durable, and it renamed nothing into place before that was (`_Durability`; the
recorder of test_powercut.py models neither hard links nor new directories).  Last, a
snapshot removed while a reader opens it (`test_a_snapshot_removed_as_it_is_opened_...`).
"""

from __future__ import annotations

import functools
import os
import signal
import stat
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from powercut_work import Picture, difference, picture
from test_golden import GOLDEN, _copy_store
from test_powercut import fsck
from test_scrub import _file

from volfs.store import history, journal, readonly, snapshots
from volfs.store.root import StoreRoot
from volfs.store.state import ROOT_INO
from volfs.store.volume import Volume

SEGMENT = 64 * 1024
NAME = "v"
#: The `os` calls that change a store (one step each); ``open`` only with O_CREAT.
WRITING_CALLS = ("open", "write", "pwrite", "pwritev", "ftruncate", "posix_fallocate", "fsync",
                 "fdatasync", "link", "rename", "replace", "mkdir", "rmdir", "unlink",
                 "copy_file_range")  # fmt: skip
GOLDEN_V1 = GOLDEN[0]
#: Hidden entries an interrupted operation may leave, and the next one sweeps.
HIDDEN = (snapshots.TAKING_PREFIX, snapshots.REMOVING_PREFIX, history.CLONING_PREFIX)


# -- the killed child ---------------------------------------------------------------------------


#: Store files whose content is advisory, never fsynced by design: a power cut may lose it.
ADVISORY = ("lock", "usage", "usage.tmp", "durable", "reserve")


class _Durability:
    """In the child only: what of the changes made to the store no fsync has made durable
    yet, by the rules of a power cut (a file's data is durable once the file is fsynced or
    fdatasynced; a name made in a directory, once the directory is fsynced), and what was
    renamed into place before it was durable (a power cut could then show it half made)."""

    def __init__(self) -> None:
        self.dirty: dict[tuple[int, int], str] = {}  #: (dev, ino) -> path, of files and dirs
        self.problems: list[str] = []

    @staticmethod
    def _path(path: object, dir_fd: object) -> str:
        if isinstance(dir_fd, int):
            return os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), os.fspath(path))
        return os.path.abspath(os.fspath(path))

    def _made_in(self, path: str) -> None:
        if os.path.basename(path) in ADVISORY:
            return
        parent = os.path.dirname(path)
        st = os.stat(parent)
        self.dirty[st.st_dev, st.st_ino] = parent

    def _changed(self, fd: object) -> None:
        st = os.fstat(fd)
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) not in ADVISORY:
            self.dirty[st.st_dev, st.st_ino] = os.readlink(f"/proc/self/fd/{fd}")

    def _published(self, path: str) -> None:
        """*path* was just renamed into place: all of it must be durable already."""
        st = os.stat(path, follow_symlinks=False)
        inside = [path]
        if stat.S_ISDIR(st.st_mode):
            inside += [os.path.join(path, n) for n in os.listdir(path) if n not in ADVISORY]
        for item in inside:
            ist = os.stat(item, follow_symlinks=False)
            if (ist.st_dev, ist.st_ino) in self.dirty:
                self.problems.append(f"{item} renamed into place before it was durable")

    def note(self, name: str, args: tuple[object, ...], kwargs: dict[str, object],
             result: object) -> None:  # fmt: skip
        """Call *name*(*args*, **kwargs*) returned *result*: note what it changed."""
        if name in ("write", "pwrite", "pwritev", "ftruncate", "posix_fallocate"):
            self._changed(args[0])
        elif name == "copy_file_range":
            self._changed(args[1])
        elif name in ("fsync", "fdatasync"):
            st = os.fstat(args[0])
            self.dirty.pop((st.st_dev, st.st_ino), None)
        elif name == "open" and int(args[1]) & (os.O_CREAT | os.O_TRUNC):
            self._made_in(self._path(args[0], kwargs.get("dir_fd")))
            if int(args[1]) & os.O_TRUNC:
                self._changed(result)
        elif name in ("mkdir", "link"):
            where = kwargs.get("dir_fd" if name == "mkdir" else "dst_dir_fd")
            self._made_in(self._path(args[-1] if name == "link" else args[0], where))
        elif name in ("rename", "replace"):
            new = self._path(args[1], kwargs.get("dst_dir_fd"))
            self._published(new)
            self._made_in(new)
        elif name == "rename_noreplace":
            new = self._path(args[2], args[0])
            self._published(new)
            self._made_in(new)

    def left(self) -> list[str]:
        """What the operation leaves not durable as it returns, and what it published early."""
        return self.problems + [f"{path} not durable" for path in sorted(self.dirty.values())]


class _Counter:
    """In the child only: counts the calls that write, reports each on a pipe, and kills the
    process right after call number *kill_after* (never, if None)."""

    def __init__(self, kill_after: int | None, report_fd: int) -> None:
        self.kill_after = kill_after
        self.report_fd = report_fd
        self.counting = False
        self.count = 0
        self.write = os.write  # the real one: the reports are not steps
        self.durability = _Durability()

    def wrap(self, name: str, call: Callable[..., object]) -> Callable[..., object]:
        def counted(*args: object, **kwargs: object) -> object:
            result = call(*args, **kwargs)
            self.durability.note(name, args, kwargs, result)
            flags = args[1] if len(args) > 1 else kwargs.get("flags", 0)
            if self.counting and (name != "open" or int(flags) & os.O_CREAT):
                self.step(name, args)
            return result

        return counted

    def step(self, name: str, args: tuple[object, ...]) -> None:
        self.count += 1
        shown = ", ".join(repr(a)[:60] for a in args if not isinstance(a, (bytes, list)))
        self.write(self.report_fd, f"{self.count} {name}({shown})\n".encode())
        if self.count == self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def begin(self) -> None:
        """The steps to count begin (killed at once if *kill_after* is 0)."""
        self.counting = True
        if self.kill_after == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    def install(self) -> None:
        for name in WRITING_CALLS:
            setattr(os, name, self.wrap(name, getattr(os, name)))
        journal.rename_noreplace = self.wrap("rename_noreplace", journal.rename_noreplace)


@dataclass
class Run:
    steps: list[str]  #: the calls that wrote, in order, as the child reported them
    killed: bool  #: whether the child was killed (else it finished the operation)
    undurable: list[str]  #: if it finished: what a power cut then could still lose


def run_killed(op: Callable[[Callable[[], None]], None], kill_after: int | None) -> Run:
    """Run *op* in a forked child, killed right after its *kill_after*-th writing call.

    *op* gets a function to call when the steps to count begin (what it does before, such as
    loading the volume a worker would have loaded, is not counted; *kill_after* 0 kills it
    there)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read_fd)
            counter = _Counter(kill_after, write_fd)
            counter.install()
            op(counter.begin)
            for problem in counter.durability.left():
                counter.write(write_fd, f"! {problem}\n".encode())
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as reports:
        lines = reports.read().decode().splitlines()
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert killed or os.WEXITSTATUS(status) == 0, f"the operation failed: status {status}"
    steps = [line for line in lines if not line.startswith("! ")]
    return Run(steps, killed, [line[2:] for line in lines if line.startswith("! ")])


# -- the store before each operation ------------------------------------------------------------


def _write(volume: Volume, path: bytes, data: bytes, now: int) -> None:
    parent = volume.inodes[ROOT_INO]
    inode = volume.inodes.get(parent.entries.get(path)) if parent.entries.get(path) else None
    if inode is None:
        inode = _file(volume, parent, path)
    volume.write(inode, 0, data, now)


def _data(tag: int, size: int) -> bytes:
    return bytes([tag]) * size


def _change(store: StoreRoot, step: int, files: int) -> None:
    """Remove, rewrite and add files of v (*step* 1, 2, ...): what snapshots before it keep,
    the volume no longer has, and some segments only those snapshots still name."""
    volume = store.open_volume(NAME, create=False)
    try:
        top_dir = volume.inodes[ROOT_INO]
        now = 100 * step
        for i in range(step - 1, files, 3):
            name = b"f%d" % i
            if name in top_dir.entries:
                volume.unlink(top_dir, name, volume.inodes[top_dir.entries[name]], now)
        _write(volume, b"f%d" % (files - step), _data(90 + step, 50_000), now + 1)
        _write(volume, b"later%d" % step, _data(70 + step, 70_000), now + 2)
    finally:
        volume.close()


def build(top: Path, clone_too: bool = True, files: int = 6) -> StoreRoot:
    """Volume v of *files* files (and a directory), then snapshot s1, changes, snapshot s2,
    more changes; a clone c0 of s1 (when *clone_too*).  The same every time."""
    store = StoreRoot(top)
    store.create_volume(NAME, segment_size=SEGMENT)
    volume = store.open_volume(NAME, create=False)
    try:
        for i in range(files):
            _write(volume, b"f%d" % i, _data(i + 1, 40_000 + 1000 * (i % 7)), 10 + i)
        folder = volume.new_inode(stat.S_IFDIR | 0o755, 0, 0, 0, 20)
        volume.create(volume.inodes[ROOT_INO], b"dir", folder, 20)
    finally:
        volume.close()
    for step, snap in enumerate(("s1", "s2"), 1):
        history.take_unserved(store, NAME, snap)
        _change(store, step, files)
    if clone_too:
        history.clone(store, NAME, "s1", "c0")
    return store


def build_golden(top: Path) -> StoreRoot:
    """The golden store of format 1 (tests/data), never snapshotted: the first take makes
    ``snapshots/`` and gives the volume format 2."""
    _copy_store(GOLDEN_V1, top)
    return StoreRoot(top)


def store_picture(top: Path) -> dict[str, Picture]:
    """What every volume and snapshot of the store at *top* holds, loaded read-only."""
    store = StoreRoot(top)
    seen: dict[str, Picture] = {}
    for name in store.names():
        loaded = readonly.open_readonly(store.volume_path(name), name)
        try:
            seen[name] = picture(loaded)
        finally:
            loaded.close()
        for snap in history.names(store, name):
            state, held = history.load(store, name, snap)
            try:
                seen[f"{name}@{snap}"] = picture(state)
            finally:
                state.close()
                os.close(held)
    return seen


def store_files(top: Path) -> set[str]:
    """The files of the store at *top* (staging names, being random, as their prefix)."""
    found = set()
    for path in (top / "volumes").rglob("*"):
        if path.is_file():
            parts = [next((p for p in HIDDEN if part.startswith(p)), part)
                     for part in path.relative_to(top).parts]  # fmt: skip
            found.add("/".join(parts))
    return found


def hidden_entries(top: Path) -> list[str]:
    """Entries of the store an interrupted operation left hidden."""
    found = [p for p in (top / "volumes").iterdir() if p.name.startswith(HIDDEN)]
    found += [p for p in (top / "volumes").glob("*/snapshots/*") if p.name.startswith(HIDDEN)]
    return sorted(str(p.relative_to(top)) for p in found)


# -- the operations ---------------------------------------------------------------------------


Op = Callable[[Callable[[], None]], None]  #: an operation as `run_killed` runs it


def _history(call: Callable[..., object], *args: str) -> Callable[[Path, str], Op]:
    """The operation ``call(store, volume, *args)`` of `volfs.store.history`."""

    def make(top: Path, name: str) -> Op:
        def op(begin: Callable[[], None]) -> None:
            begin()
            call(StoreRoot(top), name, *args)

        return op

    return make


def _take_loaded(top: Path, name: str) -> Op:
    """As a worker does: the volume loaded and changed (not synced), then snapshotted; the
    worker is not closed after (it would go on serving)."""

    def op(begin: Callable[[], None]) -> None:
        volume = StoreRoot(top).open_volume(name, create=False)
        _write(volume, b"unsynced", _data(55, 30_000), 40)
        begin()
        snapshots.take(volume, "new")

    return op


def _next_take(store: StoreRoot, name: str) -> None:
    history.take_unserved(store, name, "next")  # sweeps snapshots/'s hidden entries


def _next_list(store: StoreRoot, name: str) -> None:
    history.describe(store, name)  # sweeps what a removal left in snapshots/


def _next_rollback(store: StoreRoot, name: str) -> None:
    """Write after the rollback, then roll back to the snapshot taken after s1: the numbers
    of the segments written since never clash with those s2 names."""
    _change(store, 3, 6)
    history.rollback(store, name, "s2")


def _next_clone(store: StoreRoot, name: str) -> None:
    history.clone(store, name, "s1", "next")  # sweeps volumes/.cloning-*


#: name: (the operation, the next operation that sweeps what it leaves)
OPERATIONS: dict[str, tuple[Callable[[Path, str], Op], Callable[[StoreRoot, str], None]]] = {
    "take-unserved": (_history(history.take_unserved, "new"), _next_take),
    "take-loaded": (_take_loaded, _next_take),
    "take-first": (_history(history.take_unserved, "new"), _next_take),
    "remove": (_history(history.remove, "s1"), _next_list),
    "clone": (_history(history.clone, "s1", "c1"), _next_clone),
    "rollback": (_history(history.rollback, "s1"), _next_rollback),
}
#: How the store is made before an operation, and the volume's name (`build`'s, unless here).
BUILDS = {"take-first": (build_golden, "golden")}


# -- the checks -------------------------------------------------------------------------------


class Scene:
    """One operation on a store built by `build`, killed at each of its steps in turn."""

    def __init__(self, tmp: Path, operation: str, files: int = 6) -> None:
        self.tmp = tmp
        self.operation = operation
        self.make_op, self.next_op = OPERATIONS[operation]
        made, self.name = BUILDS.get(operation, (build, NAME))
        self.build = functools.partial(build, files=files) if made is build else made
        top = self.fresh("before")
        assert run_killed(self.make_op(top, self.name), 0).killed
        self.before = store_picture(top)  # with what the child did before the operation
        self.next_op(StoreRoot(top), self.name)
        self.files = {"before": store_files(top)}  #: what the store holds after the next op
        top = self.fresh("whole")
        whole = run_killed(self.make_op(top, self.name), None)
        assert not whole.killed
        self.steps = whole.steps
        self.after = store_picture(top)
        assert self.after != self.before, "the operation changed nothing"
        self.next_op(StoreRoot(top), self.name)
        self.after_next = store_picture(top)
        self.files["after"] = store_files(top)
        self.seen = {"before": 0, "after": 0, "hidden": 0}  #: what the kills left, how often

    def fresh(self, label: str) -> Path:
        top = self.tmp / f"{self.operation}-{label}"
        self.build(top)
        return top

    def kill_at(self, n: int) -> None:
        """Kill the operation right after its step *n*; check the store it leaves."""
        top = self.fresh(f"kill{n}")
        run = run_killed(self.make_op(top, self.name), n)
        where = f"{self.operation} killed after step {run.steps[-1] if run.steps else 0}"
        assert run.killed and _calls(run.steps) == _calls(self.steps[:n]), where
        for name in StoreRoot(top).names():
            code, out = fsck(top, name)
            assert code == 0, f"{where}: fsck {name}:\n{out}"
        got = store_picture(top)
        if got != self.before and got != self.after:
            raise AssertionError(f"{where}: the store is neither as before nor as after it:\n"
                                 f"{_differences(got, self.before, self.after)}")  # fmt: skip
        outcome = "before" if got == self.before else "after"
        self.seen[outcome] += 1
        self.seen["hidden"] += bool(hidden_entries(top))
        store = StoreRoot(top)
        self.next_op(store, self.name)
        assert hidden_entries(top) == [], f"{where}: left hidden after the next operation"
        left = store_files(top) - self.files[outcome]
        assert not left, f"{where}: files left behind after the next operation: {sorted(left)}"
        swept = store_picture(top)
        for name in store.names():  # each opens as a mount opens it, and reads as it did
            store.open_volume(name, create=False).close()
        assert store_picture(top) == swept, f"{where}: a volume changed when it was opened"
        if got == self.after:
            assert swept == self.after_next, where


def _calls(steps: list[str]) -> list[str]:
    """The calls of reported steps without their arguments (which name random staging dirs)."""
    return [step.partition("(")[0] for step in steps]


def _differences(got: dict[str, Picture], *wanted: dict[str, Picture]) -> str:
    lines = []
    for want, which in zip(wanted, ("before", "after"), strict=True):
        lines.append(f"against {which}:")
        for label in sorted(got.keys() | want.keys()):
            if label not in got or label not in want:
                lines.append(f" {label}: only {'expected' if label in want else 'found'}")
            elif got[label] != want[label]:
                lines.append(f" {label}:\n{difference(got[label], want[label])}")
    return "\n".join(lines)


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_an_operation_that_returned_survives_a_power_cut(tmp_path, operation):
    """When it returns, everything the operation wrote is durable (files and the directories
    naming them fsynced), and nothing was renamed into place before it was: so a snapshot
    that was taken, removed, cloned or rolled back to stays so through a power cut."""
    make_op, _next_op = OPERATIONS[operation]
    make, name = BUILDS.get(operation, (build, NAME))
    make(tmp_path / "store")
    run = run_killed(make_op(tmp_path / "store", name), None)
    assert run.undurable == [], "\n".join(run.undurable)


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_killed_at_each_step(tmp_path, operation):
    _kill_at_each_step(Scene(tmp_path, operation))


@pytest.mark.slow
@pytest.mark.parametrize("operation", sorted(set(OPERATIONS) - set(BUILDS)))
def test_killed_at_each_step_of_a_larger_volume(tmp_path, operation):
    """60 files over ~40 segments: links, unlinks and lacking segments by the dozen."""
    _kill_at_each_step(Scene(tmp_path, operation, files=60))


def _kill_at_each_step(scene: Scene) -> None:
    operation = scene.operation
    assert len(scene.steps) >= 3, scene.steps
    for n in range(len(scene.steps) + 1):  # 0: killed as it begins
        scene.kill_at(n)
    assert scene.seen["before"] and scene.seen["after"], scene.seen
    if operation != "rollback":  # which makes nothing hidden
        assert scene.seen["hidden"], "no kill left a hidden entry for the next one to sweep"


def test_the_kill_hook_counts_and_kills(tmp_path):
    """`run_killed` itself: the steps it reports are the calls made, and the kill is real."""
    target = tmp_path / "f"

    def op(begin: Callable[[], None]) -> None:
        target.write_bytes(b"not counted")  # before begin()
        begin()
        os.rename(target, tmp_path / "g")
        os.link(tmp_path / "g", tmp_path / "h")
        os.unlink(tmp_path / "g")

    run = run_killed(op, 2)
    assert run.killed and [s.split("(")[0] for s in run.steps] == ["1 rename", "2 link"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g", "h"]


def test_the_durability_audit_finds_a_missing_fsync(tmp_path):
    """`_Durability` itself: a file renamed into place unsynced, and a directory entry made
    and never synced, are found; the same steps with their fsyncs pass."""

    def op(synced: bool) -> Op:
        def steps(begin: Callable[[], None]) -> None:
            begin()
            top = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
            fd = os.open("f.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=top)
            os.write(fd, b"data")
            if synced:
                os.fsync(fd)
            os.close(fd)
            os.rename("f.tmp", "f", src_dir_fd=top, dst_dir_fd=top)
            if synced:
                os.fsync(top)
            os.close(top)

        return steps

    found = run_killed(op(False), None).undurable
    assert [line.replace(str(tmp_path), "T") for line in found] == [
        "T/f renamed into place before it was durable",
        "T not durable",
        "T/f.tmp not durable",
    ]
    os.unlink(tmp_path / "f")
    assert run_killed(op(True), None).undurable == []


# -- a snapshot removed while another process opens it ------------------------------------------


def _in_child(work: Callable[[], str]) -> str:
    """What *work* returns, run in a forked child (which may patch what it likes)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_fd)
            answer = work()
        except BaseException as exc:
            answer = f"raised {exc!r}"
        finally:
            os.write(write_fd, answer.encode())
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as answers:
        answer = answers.read().decode()
    os.waitpid(pid, 0)
    return answer


@pytest.mark.parametrize("how", ["removed", "renamed"])
@pytest.mark.parametrize("reader", ["load", "clone", "rollback"])
def test_a_snapshot_removed_as_it_is_opened_is_not_found_never_half(tmp_path, reader, how):
    """A removal that renames the snapshot away (and drops its lock) after a reader opened
    its directory, and before the reader takes its shared lock: the reader finds no snapshot,
    never the files the removal has not deleted yet ("renamed": a removal that has deleted
    none yet), nor the snapshot taken under the same name since."""
    top = tmp_path / "store"
    build(top, clone_too=False)
    snaps = top / "volumes" / NAME / "snapshots"

    def work() -> str:
        real_hold = snapshots.hold

        def hold_after_removal(snap_fd: int, label: str, exclusive: bool = False) -> int:
            if exclusive:  # the removal's own
                return real_hold(snap_fd, label, exclusive)
            if how == "renamed":  # what a removal does first, with its lock, before deleting
                os.rename(snaps / "s1", snaps / f"{snapshots.REMOVING_PREFIX}s1-0")
            else:
                history.remove(StoreRoot(top), NAME, "s1")
                if reader != "rollback":  # which holds the volume's lock
                    history.take_unserved(StoreRoot(top), NAME, "s1")  # another of that name
            return real_hold(snap_fd, label, exclusive)

        snapshots.hold = hold_after_removal
        store = StoreRoot(top)
        try:
            if reader == "load":
                history.load(store, NAME, "s1")
            elif reader == "clone":
                history.clone(store, NAME, "s1", "c1")
            else:
                history.rollback(store, NAME, "s1")
        except history.StoreError as exc:
            return f"{exc.code}: {exc}"
        return "done"

    assert _in_child(work) == f"{history.ErrorCode.NOT_FOUND}: no such snapshot: v@s1"
    store = StoreRoot(top)
    history.describe(store, NAME)  # a listing sweeps what a removal left
    assert store.names() == [NAME] and hidden_entries(top) == []
    assert history.names(store, NAME) == (["s2"] if how == "renamed" or reader == "rollback"
                                          else ["s1", "s2"])  # fmt: skip
