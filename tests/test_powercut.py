"""Power cuts: what a sync made durable survives, and the store opens by itself afterwards.

A SIGKILL keeps everything in the OS page cache; a power cut keeps only what reached the disk.
`powercut_disk.Recorder` logs the store's file system calls and builds the store as a power cut
at any of them could leave it.
"""

from __future__ import annotations

import os
import random
import stat

from powercut_disk import Mode, Recorder
from powercut_work import picture

from volfs.errors import VolumeDamaged
from volfs.store import check
from volfs.store import log as log_module
from volfs.store.log import segment_name
from volfs.store.root import StoreRoot
from volfs.store.volume import ROOT_INO

SEGMENT = 64 * 1024
NAME = "v"


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
        names = {name for name, _ in volume.inodes[ROOT_INO].entries.names()}
        assert names == {b"keep", b"filler"}
        assert volume.read(volume.inodes[keep.ino], 0, 100) == b"k" * 100
        assert seg + 1 not in volume.log.segments
        assert not check.check(volume)
    finally:
        volume.close()
