"""Power cuts: what a sync made durable survives, and the store opens by itself afterwards.

A SIGKILL keeps everything in the OS page cache; a power cut keeps only what reached the disk.
Each test records a random workload on a volume, run in-process through the store API
(`powercut_work.Work`), with the store's file system calls logged (`powercut_disk.Recorder`).
It then builds the store as a power cut at some call would leave it (everything fsynced before
that call, plus a subset or prefix of the rest, torn at 512-byte sectors: see
`powercut_disk.Mode`), and requires that

* the volume opens with no help (a torn tail is cut by replay),
* fsck finds nothing (`volfs.store.check`, and ``volfsd fsck`` exits 0),
* what it shows is exactly the state after some operation, at or after the last one a sync had
  made durable before the cut and no later than the one in progress: so everything fsynced
  (data, names, attributes) is there byte for byte, and nothing half-done shows.

Workloads roll segments over (small segments), checkpoint, compact, and restart the worker,
killed (nothing lost: the page cache keeps it) or cleanly.  One in a few recovered stores is
worked on further and cut again: a power cut during or after recovery.  One test mounts a
power-cut store through the CLI and FUSE and reads it back through the kernel.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import shutil
import stat
from pathlib import Path
from unittest import mock

import pytest
from powercut_disk import Image, Mode, Recorder
from powercut_work import FIELDS, Picture, Work, difference, digest, picture

from volfs import cli
from volfs.errors import VolumeDamaged
from volfs.store import check
from volfs.store import log as log_module
from volfs.store.log import segment_name
from volfs.store.root import StoreRoot
from volfs.store.state import ROOT_INO

from helpers import volfsd

SEGMENT = 64 * 1024
NAME = "v"


class Session:
    """A recorded workload: the recorder's events and the states the workload went through."""

    def __init__(self, rec: Recorder, pictures: list[Picture], work: Work) -> None:
        self.rec = rec
        self.pictures = pictures
        self.work = work

    def window(self, cut: int) -> tuple[int, int]:
        """The states a power cut at event *cut* may leave: (durable one, last one begun)."""
        return self.rec.durable_state(cut), self.rec.begun_state(cut)


def record(
    top: Path, seed: int, steps: int, name: str = NAME, weights: dict[str, int] | None = None
) -> Session:
    """Create a volume under *top* and record a random workload on it (`Work.STEPS`, or
    *weights*)."""
    store = StoreRoot(top)
    store.create_volume(name, segment_size=SEGMENT)
    rng = random.Random(seed)
    with Recorder(top) as rec:
        work = Work(rec, store, name, store.open_volume(name, create=False), rng, {})
        try:
            work.run(steps, weights)
        finally:
            work.volume.close(checkpoint=False)
    rec.check_complete()
    return Session(rec, work.pictures, work)


def fsck(top: Path, name: str) -> tuple[int, str]:
    """``volfsd fsck NAME`` in this process (it is the same code; a process costs 0.5 s)."""
    out = io.StringIO()
    with (
        mock.patch.dict(os.environ, {"VOLFS_ROOT": str(top)}),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(out),
    ):
        try:
            code = cli.main(["fsck", name])
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue()


class Checker:
    """Checks power-cut images of recorded sessions; counts what it checked."""

    def __init__(self, scratch: Path, name: str = NAME) -> None:
        self.scratch = scratch
        self.name = name
        self.cuts = 0
        self.nested = 0
        self.modes: dict[Mode, int] = dict.fromkeys(Mode, 0)
        self.recovery = _Recoveries()

    def __enter__(self) -> Checker:
        logging.getLogger("volfs.store.volume").addHandler(self.recovery)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("volfs.store.volume").removeHandler(self.recovery)

    def summary(self) -> str:
        modes = ", ".join(f"{m.value} {n}" for m, n in self.modes.items())
        return (
            f"{self.cuts} power cuts ({self.nested} of recovered stores; {modes}); "
            f"replay cut {self.recovery.torn} torn tails, {self.recovery.gaps} at a gap"
        )

    def cut_points(self, session: Session, count: int, rng: random.Random) -> list[int]:
        """*count* random cut points, the end, and as many right after a directory changed or
        was synced (checkpoints, segment removal: short windows a random pick seldom hits)."""
        events = session.rec.events
        telling = [i + 1 for i, e in enumerate(events) if e[0] in ("rename", "unlink", "dirsync")]
        return sorted(
            {
                len(events),
                *rng.sample(range(len(events) + 1), min(count, len(events) + 1)),
                *rng.sample(telling, min(count // 3, len(telling))),
            }
        )

    def run(self, session: Session, cuts: list[int], rng: random.Random, nest_every: int = 0):
        modes = [list(Mode)[i % len(Mode)] for i in range(len(cuts))]
        rng.shuffle(modes)
        for n, (cut, mode, image) in enumerate(session.rec.images(cuts, modes, rng)):
            nested = 12 if nest_every and n % nest_every == nest_every - 1 else 0
            self.check(session, cut, mode, image, rng, nested)

    def check(
        self,
        session: Session,
        cut: int,
        mode: Mode,
        image: Image,
        rng: random.Random,
        nested: int = 0,
        depth: int = 0,
    ) -> Picture:
        lo, hi = session.window(cut)
        events = len(session.rec.events)
        what = f"power cut at event {cut} of {events} ({mode.value}, depth {depth})"
        self.cuts += 1
        self.nested += depth > 0
        self.modes[mode] += 1
        # First volfsd fsck on one copy of the image: it opens the volume as a mount would.
        top = self.scratch / f"fsck-{self.cuts}"
        image.write_to(top)
        code, report = fsck(top, self.name)
        assert code == 0, f"{what}: fsck exits {code}:\n{report}\nimage: {image.describe()}"
        listed = StoreRoot(top)  # what `volfsd ls` reads: the usage file is advisory
        assert listed.names() == [self.name] and isinstance(listed.usage(self.name), dict)
        shutil.rmtree(top)
        # Then open another copy, recorded, so that a second power cut can strike the recovery.
        top = self.scratch / f"cut-{self.cuts}"
        image.write_to(top)
        store = StoreRoot(top)
        with Recorder(top) as rec:
            self.recovery.counting = True
            try:
                volume = store.open_volume(self.name, create=False)
            except Exception as exc:
                raise AssertionError(f"{what}: the volume does not open: {exc}") from exc
            finally:
                self.recovery.counting = False
            work = None
            try:
                problems = check.check(volume)
                assert not problems, f"{what}: fsck problems {problems}"
                got = picture(volume)
                if got not in session.pictures[lo : hi + 1]:
                    raise AssertionError(
                        f"{what}: the volume shows no state between {lo} (made durable by a "
                        f"sync) and {hi} (the operation in progress); against state {lo}:\n"
                        + difference(got, session.pictures[lo])
                    )
                if nested:
                    contents = {
                        i.ino: volume.read(i, 0, i.size)
                        for i in volume.inodes.values()
                        if i.extents is not None
                    }
                    work = Work(rec, store, self.name, volume, rng, contents, tag=b"n")
                    work.run(nested)
                    work.sync()
                    work.run(rng.randrange(4))
            finally:
                (work.volume if work else volume).close(checkpoint=False)
        if nested:
            rec.check_complete()
            inner = Session(rec, work.pictures, work)
            # One cut while the recovery itself ran (before the first operation), one anywhere.
            first = next(i for i, e in enumerate(rec.events) if e[0] == "begin")
            cuts = sorted({rng.randint(0, first), rng.randint(0, len(rec.events))})
            modes = [rng.choice(list(Mode)) for _ in cuts]
            for cut2, mode2, image2 in rec.images(cuts, modes, rng):
                self.check(inner, cut2, mode2, image2, rng, 0, depth + 1)
        shutil.rmtree(top)
        return got


class _Recoveries(logging.Handler):
    """Counts the torn tails replay cuts off, and how many of them were gaps in the log."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.torn = self.gaps = 0
        self.counting = False

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.counting and "torn log tail" in message:
            self.torn += 1
            self.gaps += "gap" in message


#: Seeds of the default run; the slow variant (`_long`) runs 30 more, longer.
SEEDS = [11, 33, 55, 77]


@pytest.mark.parametrize("seed", SEEDS)
def test_power_cut_at_random_points(tmp_path, seed):
    """About 60 cut points (and 15 cuts of recovered stores) per seed, every mode."""
    session = record(tmp_path / "rec", seed, steps=110)
    rec = session.rec
    assert len({e[2] for e in rec.events if e[0] == "create" and e[2].startswith("seg-")}) >= 4
    assert session.work.checkpoints + session.work.restarts > 0
    rng = random.Random(seed * 7)
    with Checker(tmp_path) as checker:
        checker.run(session, checker.cut_points(session, 35, rng), rng, nest_every=4)
    print(f"seed {seed}: {session.work.stats()}; {checker.summary()}")
    assert checker.cuts >= 45


@pytest.mark.parametrize("seed", [5, 6])
def test_power_cut_right_after_each_sync_keeps_it(tmp_path, seed):
    """The harshest cut: right after a sync returned, with nothing unsynced reaching the disk."""
    session = record(tmp_path / "rec", seed, steps=90)
    events = session.rec.events
    cuts = [i + 1 for i, e in enumerate(events) if e[0] == "synced"]
    assert len(cuts) >= 10
    rng = random.Random(seed)
    with Checker(tmp_path) as checker:
        for cut, mode, image in session.rec.images(cuts, [Mode.NONE] * len(cuts), rng):
            assert session.window(cut)[0] == events[cut - 1][1]
            checker.check(session, cut, mode, image, rng)
    print(f"seed {seed}: {checker.summary()}")


#: The usual workload with holes punched and ranges allocated (fallocate) among it.
HOLES = {**Work.STEPS, "punch": 8, "allocate": 5}


@pytest.mark.parametrize("seed", [21])
def test_power_cut_with_holes_punched_and_allocated(tmp_path, seed):
    """fallocate's frames (a punch: truncate, extents mapped again, size back; an
    allocation: the size, then zeros) are whole or absent after a cut, and replay to the
    state the served volume had."""
    session = record(tmp_path / "rec", seed, 110, weights=HOLES)
    rng = random.Random(seed)
    with Checker(tmp_path) as checker:
        checker.run(session, checker.cut_points(session, 30, rng), rng, nest_every=4)
    print(f"seed {seed}: {session.work.stats()}; {checker.summary()}")
    assert checker.cuts >= 30


COMPACTING = {"write": 10, "rewrite": 10, "create": 3, "unlink": 2, "sync": 3, "compact": 4}


@pytest.mark.parametrize("seed", [3, pytest.param(4, marks=pytest.mark.slow)])
def test_power_cut_at_every_call_of_a_compaction(tmp_path, seed):
    """Every cut point from the first relocation to the end of the checkpoint that lets the
    compacted segment go (its removal included), each in every mode (subset three times)."""
    store = StoreRoot(tmp_path / "rec")
    store.create_volume(NAME, segment_size=SEGMENT)
    rng = random.Random(seed)
    with Recorder(tmp_path / "rec") as rec:
        work = Work(rec, store, NAME, store.open_volume(NAME, create=False), rng, {})
        try:
            work.run(40, COMPACTING)
            while not any(e[:2] == ("unlink", f"volumes/{NAME}") for e in rec.events):
                work.run(5, COMPACTING)  # until a compaction removed a segment
        finally:
            work.volume.close(checkpoint=False)
    rec.check_complete()
    session = Session(rec, work.pictures, work)
    events = rec.events
    starts = [i for i, e in enumerate(events) if e == ("note", "compaction begins")]
    ends = [i for i, e in enumerate(events) if e == ("note", "compaction ends")]
    removal = max(i for i, e in enumerate(events) if e[0] == "unlink")
    first, last = max((s, e) for s, e in zip(starts, ends, strict=True) if s < removal)
    modes = [Mode.NONE, Mode.ALL, Mode.PREFIX, Mode.ORDERED] + [Mode.SUBSET] * 3
    cuts = [cut for cut in range(first, last + 2) for _ in modes]
    with Checker(tmp_path) as checker:
        for cut, mode, image in rec.images(cuts, modes * (last + 2 - first), rng):
            checker.check(session, cut, mode, image, rng)
    print(f"seed {seed}: {work.stats()}; {checker.summary()}")


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 130))
def test_power_cut_at_random_points_long(tmp_path, seed):
    session = record(tmp_path / "rec", seed, steps=250)
    rng = random.Random(seed)
    with Checker(tmp_path) as checker:
        checker.run(session, checker.cut_points(session, 80, rng), rng, nest_every=3)
    print(f"seed {seed}: {session.work.stats()}; {checker.summary()}")


def test_the_power_cut_model(tmp_path):
    """The model itself: fsynced content survives, unsynced writes tear at sectors, names last
    only once their directory is synced."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "old").write_bytes(b"o" * 700)
    with Recorder(tmp_path) as rec:
        fake_os = log_module.os  # what the store modules call while recording
        flags = os.O_RDWR | os.O_CREAT
        dir_fd = fake_os.open(str(tmp_path / "d"), os.O_RDONLY | os.O_DIRECTORY)
        fd = fake_os.open("a", flags, 0o600, dir_fd=dir_fd)
        fake_os.pwrite(fd, b"1" * 1000, 0)
        fake_os.fsync(fd)
        named = len(rec.events)
        fake_os.fsync(dir_fd)
        fake_os.pwritev(fd, [b"2" * 1000, b"3" * 500], 1000)  # sectors end at 1024, 1536, ...
        fake_os.rename("old", "new", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        fake_os.close(fd)
        fake_os.close(dir_fd)
    rec.check_complete()
    end = len(rec.events)
    rng = random.Random(1)

    def image(cut, mode):
        return next(rec.images([cut], [mode], rng))[2].files

    assert image(named, Mode.ALL) == {("d", "old"): b"o" * 700, ("d", "a"): b"1" * 1000}
    assert image(named, Mode.NONE) == {("d", "old"): b"o" * 700}
    assert image(end, Mode.NONE) == {("d", "old"): b"o" * 700, ("d", "a"): b"1" * 1000}
    new = b"1" * 1000 + b"2" * 1000 + b"3" * 500
    assert image(end, Mode.ALL) == {("d", "new"): b"o" * 700, ("d", "a"): new}
    sizes = set()
    for mode in (Mode.PREFIX, Mode.ORDERED):
        for _ in range(40):
            files = image(end, mode)
            a = files["d", "a"]
            assert a == new[: len(a)] and len(a) in (1000, 1024, 1536, 2048, 2500)
            sizes.add(len(a))
    assert len(sizes) == 5
    for _ in range(40):
        a = image(end, Mode.SUBSET)["d", "a"]
        assert a[:1000] == b"1" * 1000 and len(a) in (1000, 1024, 1536, 2048, 2500)
        for start in range(1000, len(a), 512):  # each sector all new, or zeros (never written)
            piece = a[start : start + 512 - start % 512]
            assert piece in (new[start : start + len(piece)], bytes(len(piece)))


def test_volfsd_fsck_process_on_power_cut_images(tmp_path):
    """The real ``volfsd fsck`` process (not just its code) passes power-cut images."""
    session = record(tmp_path / "rec", 77, steps=80)
    rng = random.Random(77)
    events = len(session.rec.events)
    cuts = sorted(rng.sample(range(events // 2, events), 3))
    modes = [Mode.SUBSET, Mode.PREFIX, Mode.ORDERED]
    for n, (_cut, _mode, image) in enumerate(session.rec.images(cuts, modes, rng)):
        top = tmp_path / f"img{n}"
        image.write_to(top)
        done = volfsd("fsck", NAME, root=top, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "0 problem(s)" in done.stdout


def test_a_synchronous_write_is_durable_when_it_returns(tmp_path):
    """A write whose request carries O_DSYNC (an O_DSYNC or O_SYNC descriptor, RWF_DSYNC)
    is durable when `write` returns, with no fsync after it: on the direct-I/O path the
    kernel sends none (pyfuse3 patch 0002 hands `write` the flags)."""
    import trio

    from volfs.fsops import VolumeOperations
    from volfs.localmodel import LocalModel

    class Caller:
        uid = gid = 0
        pid = 1
        umask = 0o022

    top = tmp_path / "rec"
    store = StoreRoot(top)
    store.create_volume(NAME, segment_size=SEGMENT)
    blocks = [(os.O_DSYNC, b"1"), (os.O_SYNC, b"2"), (0, b"3")]
    with Recorder(top) as rec:
        volume = store.open_volume(NAME, create=False)
        ops = VolumeOperations(LocalModel(volume))
        try:
            info, _ = trio.run(ops.create, ROOT_INO, b"f", 0o644, os.O_WRONLY, Caller())
            trio.run(ops.fsync, info.fh, False)  # the file's name is durable
            returned = []
            for i, (flags, byte) in enumerate(blocks):
                trio.run(ops.write, info.fh, i * 4096, byte * 4096, flags)
                returned.append(len(rec.events))
            trio.run(ops.release, info.fh)
        finally:
            volume.close(checkpoint=False)
    rec.check_complete()
    rng = random.Random(3)
    cuts = returned[:2]  # right after each synchronous write returned, nothing more on disk
    for n, (_cut, _mode, image) in enumerate(rec.images(cuts, [Mode.NONE] * 2, rng)):
        image.write_to(tmp_path / f"img{n}")
        again = StoreRoot(tmp_path / f"img{n}").open_volume(NAME, create=False)
        try:
            inode = again.inodes[again.inodes[ROOT_INO].entries[b"f"]]
            assert again.read(inode, 0, 1 << 20) == b"".join(b * 4096 for _, b in blocks[: n + 1])
        finally:
            again.close(checkpoint=False)


# -- through the kernel ------------------------------------------------------------------------


#: What a mount shows of each entry of a picture (inode numbers and atimes are left out).
KERNEL_FIELDS = ("path", "mode", "uid", "gid", "size", "mtime", "nlink", "target", "xattrs")


def kernel_view(entries: Picture) -> set[tuple]:
    """A picture as `read_mount` sees it through the kernel."""
    out = set()
    for entry in entries:
        fields = dict(zip(FIELDS, entry, strict=True))
        if stat.S_ISDIR(fields["mode"]):
            fields["size"] = None  # a directory's size means nothing in particular
        out.add((*(fields[f] for f in KERNEL_FIELDS), fields["content"]))
    return out


def read_mount(mnt: Path) -> set[tuple]:
    """Every name under *mnt* with what `kernel_view` keeps of it, read through the kernel."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(mnt):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            st = full.lstat()
            path = b"/" + os.fsencode(full.relative_to(mnt))
            target = dig = None
            xattrs = ()
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(os.fsencode(full))
            else:
                xattrs = tuple(
                    sorted(
                        (x.encode(), os.getxattr(full, x, follow_symlinks=False))
                        for x in os.listxattr(full, follow_symlinks=False)
                        if x.startswith("user.")
                    )
                )
                if stat.S_ISREG(st.st_mode):
                    dig = digest(full.read_bytes())
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
            seen = (st.st_mode, st.st_uid, st.st_gid, size, st.st_mtime_ns, st.st_nlink)
            out.add((path, *seen, target, xattrs, dig))
    return out


def test_power_cut_store_mounts_through_fuse(volume, tmp_path):
    """A power-cut store, mounted with the CLI, reads back through the kernel: fsynced data."""
    session = record(tmp_path / "rec", 99, steps=100, name=volume.name)
    events = session.rec.events
    # A cut a little after a sync late in the workload, when the durable state holds data.
    syncs = [i for i, e in enumerate(events) if e[0] == "synced" and i > len(events) // 2]
    cut = min(len(events), syncs[-1] + 4)
    lo, hi = session.window(cut)
    allowed = [kernel_view(p) for p in session.pictures[lo : hi + 1]]
    # Files with data that every state the cut may leave has as they are: fsynced, then not
    # touched.  (Files changed by the operation in progress may show either way.)
    synced = [e for e in set.intersection(*allowed) if e[-1] is not None and e[4] > 0]
    assert len(synced) >= 3, "the durable state should hold files with data"
    _, _, image = next(session.rec.images([cut], [Mode.SUBSET], random.Random(3)))
    image.write_to(volume.root)
    done = volfsd("fsck", volume.name, root=volume.root, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    mnt = volume.mount()
    got = read_mount(mnt)
    assert not [e[0] for e in synced if e not in got], "fsynced files differ through the mount"
    assert got in allowed, "the mount shows no state the cut may leave:\n" + "\n".join(
        sorted(str(e[:2]) for e in got ^ allowed[0])[:10]
    )
    volume.unmount()
    done = volfsd("fsck", volume.name, root=volume.root, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


# -- the durability bugs these tests found ------------------------------------------------------


def _new_file(volume, name: bytes):
    inode = volume.new_inode(stat.S_IFREG | 0o644, 0, 0, 0, 1)
    volume.create(volume.inodes[ROOT_INO], name, inode, 1)
    return volume.inodes[inode.ino]


def test_sync_after_a_restart_covers_the_log_the_killed_worker_left(tmp_path):
    """A worker killed after its log rolled over into a new segment, without a sync: the next
    worker's first sync must make the old segment's unsynced frames (and the new segment's
    name) durable too, since its durable mark vouches for everything before it."""
    top = tmp_path / "store"
    store = StoreRoot(top)
    store.create_volume(NAME, segment_size=SEGMENT)
    with Recorder(top) as rec:
        volume = store.open_volume(NAME, create=False)
        early = _new_file(volume, b"early")
        volume.write(early, 0, b"e" * 1000, 2)
        volume.sync()
        volume.write(early, 1000, b"x" * 1000, 3)  # not synced: in the page cache only
        filler = _new_file(volume, b"filler")
        while len(volume.log.segments) < 2:
            volume.write(filler, 0, os.urandom(60_000), 4)
        volume.close(checkpoint=False)  # SIGKILL: the page cache keeps everything
        volume = store.open_volume(NAME, create=False)
        late = _new_file(volume, b"late")
        volume.write(late, 0, b"L" * 5000, 5)
        volume.sync()  # fsync() returned: everything acknowledged up to here is durable
        expected = picture(volume)
        volume.close(checkpoint=False)
    cut = len(rec.events)
    _, _, image = next(rec.images([cut], [Mode.NONE], random.Random(0)))
    image.write_to(tmp_path / "after")
    volume = StoreRoot(tmp_path / "after").open_volume(NAME, create=False)
    try:
        assert picture(volume) == expected
    finally:
        volume.close(checkpoint=False)


def test_a_segment_that_ends_early_is_a_gap_not_a_seam(tmp_path):
    """The tail of one segment lost, the next segment kept (it was written back first): replay
    must stop at the gap, not go on with frames that follow frames it never saw."""
    top = tmp_path / "store"
    store = StoreRoot(top)
    volume = store.open_volume(NAME, segment_size=SEGMENT)
    root = volume.inodes[ROOT_INO]
    keep = _new_file(volume, b"keep")
    volume.write(keep, 0, b"k" * 100, 2)
    volume.sync()
    filler = _new_file(volume, b"filler")
    while volume.log.head.pos < SEGMENT - 20_000:
        volume.write(filler, 0, os.urandom(10_000), 3)
    seg = volume.log.head.seg
    cut = volume.log.head.pos  # the frames from here on in this segment will be lost
    lost = _new_file(volume, b"lost")
    while volume.log.head.seg == seg:
        volume.write(lost, 0, os.urandom(10_000), 4)
    volume.write(lost, 10_000, b"after the seam", 5)  # in the next segment
    volume.rename(root, b"keep", root, b"renamed", None, 6)
    volume.close(checkpoint=False)
    os.truncate(top / "volumes" / NAME / segment_name(seg), cut)
    try:
        volume = store.open_volume(NAME)
    except VolumeDamaged as exc:
        raise AssertionError(f"a lost unsynced tail made the volume unopenable: {exc}") from None
    try:
        names = {name for name, _ in volume.inodes[ROOT_INO].entries.items()}
        assert names == {b"keep", b"filler"}
        assert volume.read(volume.inodes[keep.ino], 0, 100) == b"k" * 100
        assert seg + 1 not in volume.log.segments
        assert not check.check(volume)
    finally:
        volume.close()
