"""Faults under the store: a full disk.

The store lives on a small tmpfs here, so the disk fills up for real: writers get ENOSPC, the
volume stays consistent and keeps serving what it holds, and deleting files in the volume makes
room again (the store punches the dead data out of its log instead of waiting for compaction).
"""

from __future__ import annotations

import errno
import os
import subprocess
import time

import pytest

from helpers import needs_root, volfsd

ROOT_ONLY = needs_root("mounting a tmpfs needs root")
DISK = 48 << 20


@pytest.fixture
def small_disk(store_root):
    """The store root on a tmpfs of DISK bytes (request it before `volume`)."""
    store_root.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(store_root)],
                   check=True)  # fmt: skip
    try:
        yield store_root
    finally:
        subprocess.run(["umount", "-l", str(store_root)], check=False)


def _fill(path, piece: int = 1 << 20) -> int:
    """Write to *path* until the disk is full; return the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as f, pytest.raises(OSError) as info:
        while True:
            written += f.write(os.urandom(piece))
    assert info.value.errno == errno.ENOSPC
    return written


def _write_when_room(path, data: bytes) -> None:
    """Write *data* to *path*, waiting for room a little: the data of a deleted file goes
    once the kernel forgets the file, which it does a moment after the unlink returns."""
    for _ in range(100):
        try:
            path.write_bytes(data)
            return
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
        time.sleep(0.05)
    path.write_bytes(data)


def _free(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@ROOT_ONLY
def test_full_disk_gives_enospc_and_room_comes_back(small_disk, volume):
    mnt = volume.mount()
    keep = {f"keep{i}": os.urandom(100_000 + i) for i in range(5)}
    for name, data in keep.items():
        (mnt / name).write_bytes(data)
    written = _fill(mnt / "big")
    assert written > DISK // 2
    # Full: what is stored still reads back, small metadata changes may or may not fit.
    assert all((mnt / n).read_bytes() == d for n, d in keep.items())
    assert _fill(mnt / "more") < 2 << 20  # full it stays: nothing dead to free yet
    os.unlink(mnt / "more")
    os.unlink(mnt / "big")
    after = os.urandom(4 << 20)  # the first write that finds the disk full frees the dead data
    _write_when_room(mnt / "after", after)
    assert _free(small_disk) > DISK // 3
    assert "gave" in volume.log_file.read_text()
    new = volume.remount()
    assert all((new / n).read_bytes() == d for n, d in keep.items())
    assert (new / "after").read_bytes() == after
    assert sorted(os.listdir(new)) == ["after", *sorted(keep)]
    volume.unmount()
    done = volfsd("fsck", volume.name, root=volume.root, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@ROOT_ONLY
def test_full_disk_across_a_remount(small_disk, volume):
    """Unmounting with the disk full loses nothing (the checkpoint may not fit), and the
    volume mounts again and frees the space of what was deleted."""
    mnt = volume.mount()
    (mnt / "keep").write_bytes(b"k" * 300_000)
    _fill(mnt / "big", piece=64 << 10)
    new = volume.remount()
    assert (new / "keep").read_bytes() == b"k" * 300_000
    os.unlink(new / "big")
    _write_when_room(new / "after", b"a" * (2 << 20))
    assert _free(small_disk) > DISK // 3
    new = volume.remount()
    assert (new / "after").read_bytes() == b"a" * (2 << 20)
    assert not (new / "big").exists()


# -- I/O errors from the store's disk ----------------------------------------------------------
#
# No device-mapper or fault injection here, so the disk's EIO is injected at the store's I/O
# calls, in-process (the FUSE layer turns the store's OSError into the same errno, logged).


def _open_store(tmp_path):
    import stat
    import time

    from volfs.store.root import StoreRoot

    root = StoreRoot(tmp_path / "store")
    root.create_volume("v")
    volume = root.open_volume("v")
    now = time.time_ns()
    files = {}
    for name in (b"good", b"victim"):
        inode = volume.new_inode(stat.S_IFREG | 0o644, 0, 0, 0, now)
        volume.create(volume.inodes[1], name, inode, now)
        files[name] = volume.inodes[inode.ino]
    return root, volume, files


def test_disk_eio_reaches_the_reader_and_spares_the_rest(tmp_path, monkeypatch):
    from volfs.store import log as store_log

    root, volume, files = _open_store(tmp_path)
    volume.write(files[b"good"], 0, b"g" * 10_000, 1)
    volume.write(files[b"victim"], 0, b"v" * 10_000, 1)
    volume.sync()
    victim_pos = next(iter(files[b"victim"].extents)).frame.pos
    real_pread = store_log.os.pread

    def failing_pread(fd, length, offset):
        if offset <= victim_pos < offset + length:
            raise OSError(errno.EIO, "Input/output error")
        return real_pread(fd, length, offset)

    monkeypatch.setattr(store_log.os, "pread", failing_pread)
    with pytest.raises(OSError) as info:
        volume.read(files[b"victim"], 0, 4096)
    assert info.value.errno == errno.EIO
    assert volume.read(files[b"good"], 0, 10_000) == b"g" * 10_000
    monkeypatch.undo()  # the disk recovers: nothing was changed by the failure
    assert volume.read(files[b"victim"], 0, 10_000) == b"v" * 10_000
    volume.close()
    again = root.open_volume("v")
    assert {n for n, _ in again.inodes[1].entries.items()} == {b"good", b"victim"}
    again.close()


def test_disk_eio_on_write_leaves_nothing_behind(tmp_path, monkeypatch):
    from volfs.store import log as store_log

    root, volume, files = _open_store(tmp_path)
    volume.write(files[b"good"], 0, b"before", 1)
    real_pwritev = store_log.os.pwritev
    calls = []

    def failing_pwritev(fd, buffers, offset):
        calls.append(offset)
        real_pwritev(fd, [b"".join(buffers)[:100]], offset)  # a part reached the disk
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(store_log.os, "pwritev", failing_pwritev)
    with pytest.raises(OSError) as info:
        volume.write(files[b"victim"], 0, b"x" * 50_000, 2)
    assert info.value.errno == errno.EIO and calls
    monkeypatch.undo()
    assert files[b"victim"].size == 0  # the failed write changed nothing
    volume.write(files[b"victim"], 0, b"after", 3)  # and the log goes on where it was
    volume.close(checkpoint=False)  # as a crash leaves it: the next open replays the log
    again = root.open_volume("v")
    by_name = {n: again.inodes[i] for n, i in again.inodes[1].entries.items()}
    assert again.read(by_name[b"good"], 0, 100) == b"before"
    assert again.read(by_name[b"victim"], 0, 100) == b"after"
    again.close()
