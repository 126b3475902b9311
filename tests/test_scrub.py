"""volfsd scrub (and fsck): every checksum is verified and damage is named by path.

Flipped bytes in a data block or in a metadata record are found: reads of damaged data fail with
EIO through the mount, scrub (on the mounted volume) and fsck (unmounted) name the file, and the
rest of the volume is unaffected.  A scrub never changes the store and never mistakes what the
server does meanwhile (appends, checkpoints, compaction deleting segments) for damage.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import threading
import time

import pytest
from test_crash import use_segment_size
from test_damage import _flip, _pattern

from volfs.checking import Progress, Throttle
from volfs.store import check, readonly
from volfs.store.check import Problem, ProblemKind
from volfs.store.root import StoreRoot
from volfs.store.state import ROOT_INO

from helpers import volfsd

MiB = 1 << 20
BLOCK = 64 * 1024


def store_digest(store) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(store.iterdir())}


def find_once(store, needle: bytes):
    """The one segment file holding *needle*, and where."""
    hits = []
    for seg in sorted(store.glob("seg-*.log")):
        content = seg.read_bytes()
        at = content.find(needle)
        if at >= 0:
            hits.append((seg, at))
            assert content.find(needle, at + 1) < 0
    assert len(hits) == 1, hits
    return hits[0]


def scrub(volume, *args: str):
    return volfsd("scrub", volume.name, *args, root=volume.root, check=False)


def fsck(volume, *args: str):
    return volfsd("fsck", volume.name, *args, root=volume.root, check=False)


# -- through the mount and the CLI ----------------------------------------------------------------


def test_scrub_clean_volume_while_a_writer_is_active(volume, mnt):
    (mnt / "dir").mkdir()
    for i in range(4):
        (mnt / "dir" / f"old{i}").write_bytes(_pattern(MiB + i * 4096))
    stop = threading.Event()
    written: dict[str, bytes] = {}
    errors: list[BaseException] = []

    def writer() -> None:
        i = 0
        try:
            while not stop.is_set():
                name = f"w{i % 7}"
                data = os.urandom(200_000 + i)
                with open(mnt / name, "wb") as f:
                    f.write(data[:100_000])
                    f.flush()
                    if i % 3 == 0:
                        os.fsync(f.fileno())
                    f.write(data[100_000:])
                written[name] = data
                if i % 5 == 4:
                    os.unlink(mnt / name)
                    del written[name]
                i += 1
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        runs = [scrub(volume, "--rate", "20") for _ in range(3)]
    finally:
        stop.set()
        thread.join()
    assert not errors
    for done in runs:
        assert done.returncode == 0, done.stdout + done.stderr
        assert "0 problem(s)" in done.stdout and "damaged" not in done.stdout
    for name, data in written.items():
        assert (mnt / name).read_bytes() == data


@pytest.mark.store_damaged("a data block damaged on purpose")
@pytest.mark.expect_log("fails its checksum")
def test_damaged_data_block_named_by_path_with_its_range(volume, mnt):
    data = _pattern(4 * MiB)
    (mnt / "dir").mkdir()
    (mnt / "dir" / "victim").write_bytes(data)
    (mnt / "bystander").write_bytes(b"unharmed " * 10_000)
    volume.unmount()
    at = 2 * MiB + 100 * 1024 + 5  # in the file
    _flip(*find_once(volume.store, data[at : at + 64]))
    lo = at // BLOCK * BLOCK
    named = f"/dir/victim: damaged data in bytes {lo}-{lo + BLOCK} (inode "

    mnt = volume.mount()
    with open(mnt / "dir" / "victim", "rb") as f:
        f.seek(at - 10)
        with pytest.raises(OSError) as info:
            f.read(100)
        assert info.value.errno == errno.EIO
        f.seek(0)
        assert f.read(lo) == data[:lo]  # everything before the damaged block reads
        f.seek(lo + BLOCK)
        assert f.read() == data[lo + BLOCK :]  # and everything after it
    assert (mnt / "bystander").read_bytes() == b"unharmed " * 10_000

    done = scrub(volume)  # while mounted
    assert done.returncode == 1, done.stdout + done.stderr
    assert named in done.stdout and "segment" in done.stdout
    assert "1 problem(s)" in done.stdout and "bystander" not in done.stdout
    assert "Traceback" not in done.stderr

    volume.unmount()
    done = fsck(volume)
    assert done.returncode == 1, done.stdout + done.stderr
    assert named in done.stdout and "bystander" not in done.stdout


@pytest.mark.store_damaged("a log record damaged on purpose")
def test_damaged_log_record_named_by_path(volume, mnt):
    """Metadata damage in the log, found while mounted by scrub and after a crash by fsck."""
    tag = b"T" * 64
    (mnt / "dir").mkdir()
    (mnt / "dir" / "victim").write_bytes(b"victim data")
    os.setxattr(mnt / "dir" / "victim", "user.tag", tag)
    (mnt / "fine").write_bytes(b"fine " * 1000)
    fd = os.open(mnt / "fine", os.O_RDONLY)
    try:
        os.fsync(fd)  # the records are durable: damage to them is decay, not a torn write
    finally:
        os.close(fd)
    seg, at = find_once(volume.store, tag)
    _flip(seg, at + 30)

    done = scrub(volume)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "/dir/victim: metadata damaged: log frame at segment" in done.stdout
    assert "/fine" not in done.stdout
    # The server still holds the state in memory: everything reads back.
    assert (mnt / "dir" / "victim").read_bytes() == b"victim data"
    assert os.getxattr(mnt / "dir" / "victim", "user.tag") == tag
    assert (mnt / "fine").read_bytes() == b"fine " * 1000

    volume.crash()  # no checkpoint: the damaged record stays part of the volume's state
    done = fsck(volume)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "/dir/victim: metadata damaged: log frame at segment" in done.stdout
    assert "/fine" not in done.stdout


@pytest.mark.store_damaged("a checkpoint damaged on purpose")
def test_damaged_checkpoint_named_by_path(volume, mnt):
    tag = b"C" * 64
    (mnt / "dir").mkdir()
    (mnt / "dir" / "victim").write_bytes(b"x")
    os.setxattr(mnt / "dir" / "victim", "user.tag", tag)
    volume.unmount()  # the state is now in the checkpoint
    checkpoint = volume.store / "checkpoint"
    _flip(checkpoint, checkpoint.read_bytes().index(tag) + 5)
    for done in (fsck(volume), scrub(volume)):
        assert done.returncode == 1, done.stdout + done.stderr
        assert "/dir/victim: metadata damaged: checkpoint frame at offset 0" in done.stdout
        assert "Traceback" not in done.stderr


def test_scrub_does_not_modify_the_store(volume, mnt):
    (mnt / "a").write_bytes(_pattern(3 * MiB))
    (mnt / "b").write_bytes(b"b" * 100)
    path = volume.crash()  # no checkpoint: scrub replays the log
    seg = max(volume.store.glob("seg-*.log"))
    with open(seg, "ab") as f:
        f.write(os.urandom(300))  # a torn tail, which a mount would cut
    before = store_digest(volume.store)
    done = scrub(volume, "--rate", "0")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "was not checked" in done.stdout  # the tail is noted, not cut
    assert store_digest(volume.store) == before
    mnt = volume.mount(path)
    assert (mnt / "a").read_bytes() == _pattern(3 * MiB)


def test_scrub_during_compaction_reports_no_damage(volume, tmp_path):
    """Small segments and overwrite churn make the server compact (and delete segments) while
    scrubs run; none of them may report damage."""
    use_segment_size(volume, 256 * 1024)
    mnt = volume.mount()
    piece, rounds = 16 * 1024, 600
    runs = []
    stop = threading.Event()

    def scrubber() -> None:
        while not stop.is_set():
            runs.append(scrub(volume, "--rate", "10"))  # slow: more of it overlaps compaction

    thread = threading.Thread(target=scrubber)
    thread.start()
    try:
        junk = os.open(mnt / "junk", os.O_WRONLY | os.O_CREAT, 0o644)
        keep = os.open(mnt / "keep", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for i in range(rounds):
                os.pwrite(junk, os.urandom(128 * 1024), 0)
                os.pwrite(keep, b"%015d\n" % i * (piece // 16), i * piece)
        finally:
            os.close(junk)
            os.close(keep)
        for _ in range(600):  # the compaction goes on after the writes, between requests
            if volume.log_file.read_text(errors="replace").count("compacting segment") > 5:
                break
            time.sleep(0.1)
        count = len(runs)
        while len(runs) < count + 2:
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join()
    assert "compacting segment" in volume.log_file.read_text(errors="replace")
    for done in runs:
        assert done.returncode == 0, done.stdout + done.stderr
        assert "0 problem(s)" in done.stdout
    want = b"".join(b"%015d\n" % i * (piece // 16) for i in range(rounds))
    assert (mnt / "keep").read_bytes() == want
    print(f"{len(runs)} scrubs; {sum('moved by compaction' in r.stdout for r in runs)} skipped "
          "data that compaction moved")  # fmt: skip


def test_scrub_refusals(store_root, volume, mnt):
    done = volfsd("scrub", "ghost", root=store_root, check=False)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "no such volume" in done.stderr
    done = volfsd("scrub", "Bad/Name", root=store_root, check=False)
    assert done.returncode == 2 and "invalid volume name" in done.stderr
    done = volfsd("scrub", volume.name, "--rate", "-3", root=store_root, check=False)
    assert done.returncode == 2 and "invalid rate" in done.stderr  # not checked: 1 means damage
    done = volfsd("scrub", volume.name, root=store_root, check=False)
    assert done.returncode == 0 and "0 problem(s)" in done.stdout  # an empty, mounted volume


# -- the store side, without FUSE -------------------------------------------------------------


def _file(volume, parent, name: bytes):
    inode = volume.new_inode(stat.S_IFREG | 0o644, 0, 0, 0, 1)
    volume.create(parent, name, inode, 1)
    return volume.inodes[inode.ino]  # the inode the volume made of the records


def test_snapshot_skips_data_compaction_moved_away(tmp_path):
    root = StoreRoot(tmp_path / "store")
    volume = root.open_volume("v", segment_size=64 * 1024)
    try:
        top = volume.inodes[ROOT_INO]
        keep, junk = _file(volume, top, b"keep"), _file(volume, top, b"junk")
        for i in range(40):
            volume.write(keep, i * 1000, os.urandom(1000), 2)
            volume.write(junk, 0, os.urandom(30_000), 2)
        volume.checkpoint()
        snapshot = readonly.open_readonly(root.volume_path("v"), "v")
        try:
            assert volume.live_ranges()[min(volume.log.segments)]  # keep's data is spread out
            for seg in list(volume.log.segments[:-1]):  # what the worker's compaction does
                for ino, start, length in volume.live_ranges()[seg]:
                    volume.relocate(ino, start, length, seg)
            volume.checkpoint()  # which deletes the segments emptied
            report = check.examine(snapshot)
        finally:
            snapshot.close()
        assert report.problems == [] and report.moved > 0
        assert report.verified + report.moved == 40_000 + 30_000
        assert "moved by compaction" in report.notes[-1]
    finally:
        volume.close()


def test_snapshot_loads_again_when_the_checkpoint_is_replaced(tmp_path):
    """The server checkpoints (and deletes emptied segments the loaded checkpoint's replay
    needs) while a snapshot loads: the snapshot loads again from the new checkpoint."""
    root = StoreRoot(tmp_path / "store")
    volume = root.open_volume("v", segment_size=64 * 1024)
    try:
        top = volume.inodes[ROOT_INO]
        keep, junk = _file(volume, top, b"keep"), _file(volume, top, b"junk")
        volume.checkpoint()
        for i in range(40):
            volume.write(keep, i * 1000, os.urandom(1000), 2)
        for _ in range(40):  # segments that hold nothing live once overwritten
            volume.write(junk, 0, os.urandom(30_000), 2)
        volume.sync()
        calls = []

        def pace(nbytes: int) -> None:
            if not calls:
                volume.checkpoint()  # between the snapshot's checkpoint read and its replay
            calls.append(nbytes)

        snapshot = readonly.open_readonly(root.volume_path("v"), "v", pace)
        try:
            assert snapshot.checkpoint_at == volume.checkpoint_at  # the new one
            report = check.examine(snapshot)
            content = snapshot.read(snapshot.inodes[keep.ino], 0, 40_000)
        finally:
            snapshot.close()
        assert report.problems == [] and report.verified == 70_000
        assert content == volume.read(keep, 0, 40_000)
    finally:
        volume.close()


def test_missing_segments_are_damage(tmp_path):
    """Segments deleted behind the server's back: the data of a file, and a piece of the log
    in the middle and at the end (the durable mark says the log goes on)."""
    root = StoreRoot(tmp_path / "store")
    volume = root.open_volume("v", segment_size=64 * 1024)
    top = volume.inodes[ROOT_INO]
    old, new = _file(volume, top, b"old"), _file(volume, top, b"new")
    for n in range(3):  # a segment each
        volume.write(old if n == 0 else new, n * 100_000, os.urandom(100_000), 2)
    volume.checkpoint()
    for n in range(3, 6):
        volume.write(new, n * 100_000, os.urandom(100_000), 3)
    volume.sync()
    segs = [next(volume.inodes[old.ino].extents.pieces(0, 1))[2].seg]
    segs += [next(volume.inodes[new.ino].extents.pieces(n * 100_000, n * 100_000 + 1))[2].seg
             for n in (3, 5)]  # fmt: skip
    volume.close(checkpoint=False)
    for seg in segs:
        (root.volume_path("v") / f"seg-{seg:08d}.log").unlink()
    snapshot = readonly.open_readonly(root.volume_path("v"), "v")
    try:
        report = check.examine(snapshot)
    finally:
        snapshot.close()
    assert sorted(report.problems) == [
        Problem("(store)", f"log segment {segs[1]} is missing; what it held is unreadable",
                ProblemKind.MISSING_SEGMENT),
        Problem("(store)", f"log segment {segs[2]} is missing; what it held is unreadable",
                ProblemKind.MISSING_SEGMENT),
        Problem("/old", f"data in missing segment {segs[0]}", ProblemKind.MISSING_SEGMENT, old.ino),
    ]  # fmt: skip


def test_snapshot_settles_for_a_prefix_when_the_checkpoint_keeps_changing(tmp_path, monkeypatch):
    root = StoreRoot(tmp_path / "store")
    volume = root.open_volume("v", segment_size=64 * 1024)
    try:
        top = volume.inodes[ROOT_INO]
        keep, junk = _file(volume, top, b"keep"), _file(volume, top, b"junk")
        volume.write(keep, 0, b"k" * 5000, 2)

        def churn() -> None:
            volume.checkpoint()  # deletes the junk segments the loading snapshot needs
            for _ in range(10):
                volume.write(junk, 0, os.urandom(30_000), 3)
            volume.sync()

        churn()
        loaded = readonly.ReadOnlyState._load_checkpoint

        def load_checkpoint(self):
            start = loaded(self)
            churn()  # every time, between the snapshot's checkpoint read and its replay
            return start

        monkeypatch.setattr(readonly.ReadOnlyState, "_load_checkpoint", load_checkpoint)
        monkeypatch.setattr(readonly, "LOAD_ATTEMPTS", 2)
        snapshot = readonly.open_readonly(root.volume_path("v"), "v")
        try:
            report = check.examine(snapshot)
        finally:
            snapshot.close()
        assert report.problems == []
        assert "(its segment file went away)" in report.notes[0]
    finally:
        volume.close()


def test_snapshot_goes_on_after_a_damaged_log_frame(tmp_path):
    root = StoreRoot(tmp_path / "store")
    volume = root.open_volume("v")
    top = volume.inodes[ROOT_INO]
    first = _file(volume, top, b"first")
    volume.write(first, 0, b"1" * 5000, 2)
    volume.set_xattr(first, b"user.tag", b"X" * 64, 3)
    later = _file(volume, top, b"later")
    volume.write(later, 0, b"2" * 5000, 4)
    volume.sync()
    volume.close(checkpoint=False)
    seg, at = find_once(root.volume_path("v"), b"X" * 64)
    _flip(seg, at + 3)
    before = store_digest(root.volume_path("v"))
    snapshot = readonly.open_readonly(root.volume_path("v"), "v")
    try:
        report = check.examine(snapshot)
        assert snapshot.read(snapshot.inodes[later.ino], 0, 5000) == b"2" * 5000
    finally:
        snapshot.close()
    assert store_digest(root.volume_path("v")) == before
    assert [p.path for p in report.problems] == ["/first"]
    assert "metadata damaged: log frame at segment 1 offset" in report.problems[0].what
    assert report.verified == 10_000


# -- pacing and progress -----------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept += seconds
        self.now += seconds


def test_throttle_keeps_the_average_rate():
    clock = FakeClock()
    throttle = Throttle(10e6, clock=clock, sleep=clock.sleep)
    for _ in range(100):
        throttle(1_000_000)  # 100 MB at 10 MB/s: ~10 s, less the first burst of 1 MB
    assert 9.8 < clock.slept < 10.0
    clock.now += 60  # idle time earns one burst, not a minute's worth
    start = clock.slept
    for _ in range(5):
        throttle(1_000_000)
    assert 0.3 < clock.slept - start < 0.5


def test_progress_bar_on_a_terminal_and_lines_elsewhere():
    clock = FakeClock()
    out = io.StringIO()
    bar = Progress("scrub v", 200_000_000, out, tty=True, clock=clock)
    bar.update(0)
    assert out.getvalue() == ""  # nothing before the first interval
    clock.now += 1
    bar.update(50_000_000)
    bar.update(60_000_000)  # too soon after the last redraw
    clock.now += 1
    bar.update(100_000_000)
    bar.finish()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n")
    assert "[#######-----" in text and " 25% 50.0/200.0 MB, 50 MB/s" in text
    assert " 50% " in text and "100% " in text

    out = io.StringIO()
    lines = Progress("fsck v", 1000, out, tty=False, clock=clock)
    clock.now += 5
    lines.update(100)
    clock.now += 6
    lines.update(500)
    clock.now += 6
    lines.update(600)
    lines.finish()
    assert out.getvalue().splitlines() == ["fsck v:  50% 0.0/0.0 MB, 0 MB/s"]


def test_a_snapshot_has_no_writing_method():
    """Read-only by construction: nothing the writing volume or log adds is reachable from a
    snapshot or its log (no deny-list to keep up to date)."""
    from volfs.store.log import SegmentLog, SegmentReader
    from volfs.store.state import VolumeState
    from volfs.store.volume import Volume

    snapshot_class, log_class = readonly.ReadOnlyState, readonly.ReadOnlyLog
    assert issubclass(snapshot_class, VolumeState) and not issubclass(snapshot_class, Volume)
    assert issubclass(log_class, SegmentReader) and not issubclass(log_class, SegmentLog)
    # What the writing classes add to the readers (minus names both define for themselves,
    # such as close, and dunders) is not reachable from the snapshot's classes.
    writing = {n for n in set(vars(Volume)) - set(vars(VolumeState)) if not n.startswith("__")}
    assert not (writing - set(vars(snapshot_class))) & set(dir(snapshot_class))
    appending = {n for n in set(vars(SegmentLog)) - set(vars(SegmentReader)) if n[:2] != "__"}
    assert not (appending - set(vars(log_class))) & set(dir(log_class))
    assert {"commit", "checkpoint", "fork_checkpoint", "sync", "save_usage"} <= writing
    assert {"append", "sync", "punch", "remove_segment", "discard_after"} <= appending
