"""Power cuts: what a sync made durable survives, and the store opens by itself afterwards."""

from __future__ import annotations

import os
import stat

from volfs.errors import VolumeDamaged
from volfs.store import check
from volfs.store.log import segment_name
from volfs.store.root import StoreRoot
from volfs.store.volume import ROOT_INO

SEGMENT = 64 * 1024
NAME = "v"


def _new_file(volume, name: bytes):
    inode = volume.new_inode(stat.S_IFREG | 0o644, 0, 0, 0, 1)
    volume.create(volume.inodes[ROOT_INO], name, inode, 1)
    return volume.inodes[inode.ino]


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
