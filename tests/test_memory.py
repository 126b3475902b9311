"""What the in-memory metadata costs per file.

All of a volume's metadata is held in memory, so its size per file decides how many files a
volume can hold.  Measured here: 368 bytes per empty file, 856 per 4 KiB file; with the
allocator's overhead and the interpreter, a million empty files took 453 MiB (`bench/run.py`'s
scale table; the goal is under 500 MiB).  The budgets below allow about 20% more than today
before failing.  tracemalloc counts the Python allocations the volume keeps, which do not
depend on timing or on the machine.
"""

from __future__ import annotations

import gc
import stat
import tracemalloc

import pytest

from volfs.store.root import StoreRoot
from volfs.store.state import ROOT_INO

FILES = 20_000
PER_DIRECTORY = 1000


@pytest.mark.parametrize(("data", "budget"), [(b"", 450), (b"x" * 4096, 1000)])
def test_bytes_per_file_stay_within_budget(tmp_path, data, budget):
    volume = StoreRoot(tmp_path / "store").open_volume("v")
    try:
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for d in range(FILES // PER_DIRECTORY):
                directory = volume.new_inode(stat.S_IFDIR | 0o755, 0, 0, 0, 1)
                volume.create(volume.inodes[ROOT_INO], b"dir%d" % d, directory, 1)
                parent = volume.inodes[directory.ino]
                for f in range(PER_DIRECTORY):
                    inode = volume.new_inode(stat.S_IFREG | 0o644, 0, 0, 0, 2)
                    volume.create(parent, b"file-%07d" % f, inode, 2)
                    if data:
                        volume.write(volume.inodes[inode.ino], 0, data, 3)
            per_file = (tracemalloc.get_traced_memory()[0] - before) / FILES
        finally:
            tracemalloc.stop()
        print(f"{per_file:.0f} bytes per file ({len(data)} bytes of data)")
        assert per_file < budget
    finally:
        volume.close(checkpoint=False)
