"""Recovery of the store itself, without FUSE: a log cut or garbled at any point replays to
exactly the operations that were complete before that point."""

from __future__ import annotations

import os
import random
import shutil
import stat
import time

import pytest

from volfs.errors import VolumeDamaged
from volfs.store.log import PREFILL, segment_name
from volfs.store.naming import path_of
from volfs.store.root import StoreRoot
from volfs.store.state import ROOT_INO
from volfs.store.volume import Volume


def picture(volume: Volume) -> dict[str, tuple]:
    """Path -> (mode, content or target or None, xattrs) for the whole volume."""
    out = {}

    def walk(ino: int, prefix: str) -> None:
        for name, child_ino in volume.inodes[ino].entries.items():
            child = volume.inodes[child_ino]
            path = f"{prefix}/{name.decode()}"
            if child.extents is not None:
                content = volume.read(child, 0, child.size)
            else:
                content = child.target
            out[path] = (child.mode, child.nlink, content, dict(child.xattrs or {}))
            if child.entries is not None:
                walk(child_ino, path)

    walk(ROOT_INO, "")
    return out


def workload(volume: Volume, rng: random.Random):
    """Apply a mix of operations; yield (log end, picture) after each one."""
    now = time.time_ns
    root = volume.inodes[ROOT_INO]
    files = []
    for step in range(60):
        choice = rng.random()
        if choice < 0.3 or not files:
            inode = volume.new_inode(stat.S_IFREG | 0o644, 0, 0, 0, now())
            name = b"f%d" % step
            volume.create(root, name, inode, now())
            files.append(name)
        elif choice < 0.6:
            inode = volume.inodes[root.entries.get(rng.choice(files))]
            data = rng.randbytes(rng.choice([10, 5000, 70_000, 200_000]))
            volume.write(inode, rng.randrange(0, 100_000), data, now())
        elif choice < 0.7:
            inode = volume.inodes[root.entries.get(rng.choice(files))]
            volume.set_attrs(inode, size=rng.randrange(0, 50_000), ctime_ns=now())
        elif choice < 0.8:
            old = rng.choice(files)
            new = b"r%d" % step
            volume.rename(root, old, root, new, None, now())
            files[files.index(old)] = new
        elif choice < 0.9:
            name = files.pop(rng.randrange(len(files)))
            volume.unlink(root, name, volume.inodes[root.entries.get(name)], now())
        else:
            inode = volume.inodes[root.entries.get(rng.choice(files))]
            volume.set_xattr(inode, b"user.step", b"%d" % step, now())
        yield volume.log.head, picture(volume)


@pytest.fixture
def recorded(tmp_path):
    """A volume's store after a workload, left as a killed process leaves it, plus the history."""
    root = StoreRoot(tmp_path / "store")
    volume = root.open_volume("v")
    history = [(volume.log.head, picture(volume))]
    history += list(workload(volume, random.Random(7)))
    volume.close(checkpoint=False)
    return tmp_path / "store", history


def _reopen(store, tmp_path, mutate) -> dict:
    copy = tmp_path / f"copy-{time.monotonic_ns()}"
    shutil.copytree(store, copy)
    mutate(copy / "volumes" / "v")
    volume = StoreRoot(copy).open_volume("v")
    try:
        return picture(volume)
    finally:
        volume.close(checkpoint=False)
        shutil.rmtree(copy)


def _expected_at(history, seg: int, cut: int) -> dict:
    """The picture after the last operation whose frame ended at or before the cut."""
    best = history[0][1]
    for (hseg, hpos), pic in history:
        if (hseg, hpos) <= (seg, cut):
            best = pic
    return best


def test_cut_anywhere_replays_a_prefix(recorded, tmp_path):
    store, history = recorded
    seg_file = max((store / "volumes" / "v").glob("seg-*.log"))
    seg = int(seg_file.stem.split("-")[1])
    size = seg_file.stat().st_size
    rng = random.Random(1)
    cuts = sorted({*rng.sample(range(size), 120), *(pos for (s, pos), _ in history if s == seg)})
    for cut in cuts:
        got = _reopen(store, tmp_path, lambda d, cut=cut: os.truncate(d / seg_file.name, cut))
        assert got == _expected_at(history, seg, cut), f"cut at {cut}"


def test_garbage_after_a_cut_is_dropped(recorded, tmp_path):
    store, history = recorded
    seg_file = max((store / "volumes" / "v").glob("seg-*.log"))
    seg = int(seg_file.stem.split("-")[1])
    rng = random.Random(2)
    for _ in range(30):
        cut = rng.randrange(seg_file.stat().st_size)

        def garble(d, cut=cut):
            with open(d / seg_file.name, "r+b") as f:
                f.truncate(cut)
                f.seek(cut)
                f.write(rng.randbytes(rng.randrange(1, 3000)))

        assert _reopen(store, tmp_path, garble) == _expected_at(history, seg, cut)


def test_reopened_volume_keeps_working_after_a_cut(recorded):
    store, _history = recorded
    seg_file = max((store / "volumes" / "v").glob("seg-*.log"))
    os.truncate(seg_file, seg_file.stat().st_size - 7)
    volume = StoreRoot(store).open_volume("v")
    root = volume.inodes[ROOT_INO]
    inode = volume.new_inode(stat.S_IFREG | 0o600, 0, 0, 0, 1)
    volume.create(root, b"after", inode, 1)
    volume.write(volume.inodes[inode.ino], 0, b"new data", 2)
    expected = picture(volume)
    volume.close(checkpoint=False)
    volume = StoreRoot(store).open_volume("v")
    assert picture(volume) == expected
    volume.close()
    volume = StoreRoot(store).open_volume("v")  # from the checkpoint this time
    assert picture(volume) == expected
    volume.close()


def test_damage_before_a_sync_point_is_reported_not_cut(tmp_path):
    root = StoreRoot(tmp_path / "store")
    volume = root.open_volume("v")
    inode = volume.new_inode(stat.S_IFREG | 0o644, 0, 0, 0, 1)
    volume.create(volume.inodes[ROOT_INO], b"f", inode, 1)
    volume.sync()  # records the log up to here as durable
    volume.close(checkpoint=False)
    seg_file = max((tmp_path / "store" / "volumes" / "v").glob("seg-*.log"))
    with open(seg_file, "r+b") as f:
        f.seek(100)  # inside the first operation's frame, after the segment header
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(VolumeDamaged):
        root.open_volume("v")


def test_decayed_durable_data_is_kept_and_reported(tmp_path):
    """Data damaged before the durable mark is decay: kept, and its reads fail; after it, cut."""
    from volfs.errors import DataDamaged

    root = StoreRoot(tmp_path / "store")
    volume = root.open_volume("v")
    inode = volume.new_inode(stat.S_IFREG | 0o644, 0, 0, 0, 1)
    volume.create(volume.inodes[ROOT_INO], b"f", inode, 1)
    inode = volume.inodes[inode.ino]
    volume.write(inode, 0, b"A" * 100_000, 2)
    volume.sync()
    volume.write(inode, 100_000, b"B" * 100_000, 3)  # not synced
    volume.close(checkpoint=False)
    seg_file = max((tmp_path / "store" / "volumes" / "v").glob("seg-*.log"))
    raw = seg_file.read_bytes()
    with open(seg_file, "r+b") as f:
        f.seek(raw.index(b"A" * 1000) + 70_000)
        f.write(b"a")
    volume = root.open_volume("v")
    inode = volume.inodes[inode.ino]
    assert inode.size == 200_000
    with pytest.raises(DataDamaged):
        volume.read(inode, 65_536, 10)
    assert volume.read(inode, 0, 1000) == b"A" * 1000
    assert volume.read(inode, 150_000, 10) == b"B" * 10
    volume.close(checkpoint=False)
    with open(seg_file, "r+b") as f:  # now damage the unsynced write: a torn tail
        f.seek(raw.index(b"B" * 1000) + 10)
        f.write(b"b")
    volume = root.open_volume("v")
    assert volume.inodes[inode.ino].size == 100_000
    volume.close(checkpoint=False)


def test_data_in_a_missing_segment_reads_as_damage(tmp_path, caplog):
    """A segment file deleted behind the store's back: reads of the data in it raise the
    store's data-damage error naming the segment, with a log line (the FUSE layer answers
    EIO), not the FileNotFoundError of the open; the rest of the file still reads."""
    from volfs.errors import DataDamaged
    from volfs.store.state import SegmentMissing

    root = StoreRoot(tmp_path / "store")
    volume = root.open_volume("v", segment_size=64 * 1024)
    inode = volume.new_inode(stat.S_IFREG | 0o644, 0, 0, 0, 1)
    volume.create(volume.inodes[ROOT_INO], b"f", inode, 1)
    inode = volume.inodes[inode.ino]
    volume.write(inode, 0, b"A" * 100_000, 2)
    volume.write(inode, 100_000, b"B" * 100_000, 3)
    first = next(inode.extents.pieces(0, 1))[2].seg
    assert next(inode.extents.pieces(100_000, 100_001))[2].seg != first
    volume.close()  # checkpointed: replay needs no segment before the log's end
    (tmp_path / "store" / "volumes" / "v" / f"seg-{first:08d}.log").unlink()
    volume = root.open_volume("v")
    try:
        inode = volume.inodes[inode.ino]
        caplog.set_level("ERROR", logger="volfs.store")
        with pytest.raises(DataDamaged) as raised:
            volume.read(inode, 10, 10)
        assert isinstance(raised.value, SegmentMissing)
        assert raised.value.seg == first
        assert any(f"missing segment {first}" in r.getMessage() for r in caplog.records)
        assert volume.read(inode, 150_000, 10) == b"B" * 10
    finally:
        volume.close(checkpoint=False)


def test_compaction_bounds_the_log_and_keeps_data(tmp_path):
    """Rewriting a file over and over: compaction keeps the log near the live size."""
    root = StoreRoot(tmp_path / "store")
    volume = root.open_volume("v", segment_size=256 * 1024)
    inode = volume.new_inode(stat.S_IFREG | 0o644, 0, 0, 0, 1)
    volume.create(volume.inodes[ROOT_INO], b"db", inode, 1)
    inode = volume.inodes[inode.ino]
    rng = random.Random(3)
    model = bytearray(rng.randbytes(512 * 1024))
    volume.write(inode, 0, bytes(model), 2)
    for step in range(3000):
        offset = rng.randrange(0, len(model) - 4096)
        data = rng.randbytes(rng.choice([100, 4096]))
        model[offset : offset + len(data)] = data
        volume.write(inode, offset, data, 3)
        if step % 50 == 0:
            while (seg := volume.compaction_victim(min_garbage=512 * 1024)) is not None:
                for ino, start, length in volume.live_ranges()[seg]:
                    volume.relocate(ino, start, length, seg)
                volume.checkpoint()
                assert seg not in volume.log.segments
    assert volume.read(inode, 0, len(model)) == model
    assert sum(volume.log.sizes().values()) < 4 * len(model) + 2 * 512 * 1024
    volume.close()
    volume = root.open_volume("v")
    assert volume.read(volume.inodes[inode.ino], 0, len(model)) == model
    assert volume.used == len(model)
    volume.close()


def test_store_errors_carry_their_codes(tmp_path):
    """Callers decide on a store error's code, never on its text."""
    from volfs.errors import ErrorCode, StoreError

    root = StoreRoot(tmp_path / "store")
    with pytest.raises(StoreError) as missing:
        root.open_volume("nope", create=False)
    assert missing.value.code is ErrorCode.NOT_FOUND
    volume = root.open_volume("v")
    try:
        with pytest.raises(StoreError) as served:
            root.open_volume("v")
        assert served.value.code is ErrorCode.ALREADY_SERVED
        with pytest.raises(StoreError) as smaller:
            volume.set_limits(-1, 0)
        assert smaller.value.code is ErrorCode.INVALID
    finally:
        volume.close()


def test_path_of_names_files_and_directories_for_damage_lines(tmp_path):
    """`path_of`, which damage log lines use: a file's path through its directories, after a
    rename, with an undecodable name; None once its last name is gone."""
    root = StoreRoot(tmp_path / "store")
    volume = root.open_volume("v")
    try:
        top = volume.inodes[ROOT_INO]
        a = volume.new_inode(stat.S_IFDIR | 0o755, 0, 0, 0, 1)
        volume.create(top, b"a", a, 1)
        b = volume.new_inode(stat.S_IFDIR | 0o755, 0, 0, 0, 1)
        volume.create(volume.inodes[a.ino], b"b\xff", b, 1)
        f = volume.new_inode(stat.S_IFREG | 0o644, 0, 0, 0, 1)
        volume.create(volume.inodes[b.ino], b"f", f, 1)
        assert path_of(volume, f.ino) == "/a/b\\xff/f"
        assert path_of(volume, b.ino) == "/a/b\\xff" and path_of(volume, ROOT_INO) == "/"
        volume.rename(volume.inodes[a.ino], b"b\xff", top, b"c", None, 2)
        assert path_of(volume, f.ino) == "/c/f"
        volume.unlink(volume.inodes[b.ino], b"f", volume.inodes[f.ino], 3)
        assert path_of(volume, f.ino) is None
    finally:
        volume.close(checkpoint=False)


def _small_synced_writes(volume: Volume, count: int, name: bytes = b"db") -> list:
    """A database's commits: a small write and a sync, *count* times; the log's head before
    each write."""
    inode = volume.new_inode(stat.S_IFREG | 0o644, 0, 0, 0, 1)
    volume.create(volume.inodes[ROOT_INO], name, inode, 1)
    heads = []
    for i in range(count):
        heads.append(volume.log.head)
        volume.write(volume.inodes[inode.ino], i * 100, b"%099d\n" % i, i + 2)
        volume.sync()
    return heads


def test_small_syncs_write_zeros_ahead_and_replay_stops_at_them(tmp_path, caplog):
    """Small syncs in a row leave zeros written ahead of the log's head (`PREFILL`), so later
    ones overwrite allocated blocks; a volume killed then replays every synced write, stops
    at the zeros without calling them a torn tail, and goes on writing over them."""
    root = StoreRoot(tmp_path / "store")
    volume = root.open_volume("v")
    _small_synced_writes(volume, 20)
    head = volume.log.head
    seg_file = tmp_path / "store" / "volumes" / "v" / segment_name(head.seg)
    ahead = seg_file.read_bytes()[head.pos :]
    assert len(ahead) >= PREFILL // 4 and ahead.count(0) == len(ahead)
    expected = picture(volume)
    volume.close(checkpoint=False)  # as a killed worker leaves it
    caplog.set_level("WARNING", logger="volfs.store")
    volume = root.open_volume("v")
    try:
        assert picture(volume) == expected
        assert not caplog.records, [r.getMessage() for r in caplog.records]
        _small_synced_writes(volume, 5, b"more")
        expected = picture(volume)
    finally:
        volume.close(checkpoint=False)
    volume = root.open_volume("v")
    assert picture(volume) == expected
    volume.close()


def test_zeros_where_synced_frames_were_are_damage_not_the_end(tmp_path):
    """Zeros from a synced frame on to the end of the last segment look like what a sync
    writes ahead, but lie before the durable mark: the data was lost, so the volume is
    reported damaged rather than cut back to before it."""
    root = StoreRoot(tmp_path / "store")
    volume = root.open_volume("v")
    heads = _small_synced_writes(volume, 20)
    volume.close(checkpoint=False)
    seg_file = tmp_path / "store" / "volumes" / "v" / segment_name(heads[15].seg)
    size = seg_file.stat().st_size
    with open(seg_file, "r+b") as f:
        f.seek(heads[15].pos)
        f.write(bytes(size - heads[15].pos))
    with pytest.raises(VolumeDamaged):
        root.open_volume("v")
