"""Sizes and inode limits: everything a user can store counts, and the store's disk use stays
within a stated bound of the size.

First the accounting in the store alone (cheap, many operations), then through real mounts:
xattrs, symlinks and directories on a full volume, the inode limit, the disk-use bound under
overwrites, resizing, and the CLI's refusals.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import stat
import subprocess
import time
from pathlib import Path

import pytest

from volfs.errors import NoSpace, StoreError
from volfs.store.root import StoreRoot
from volfs.store.space import log_bound, segment_size_for
from volfs.store.state import ENTRY_COST, EXTENT_COST, INODE_COST, ROOT_INO, XATTR_COST
from volfs.store.volume import Volume

from helpers import run_dir_of, stop_daemon, volfsd

MIB = 1 << 20


def store_bound(size: int, segment_size: int) -> int:
    """What ARCHITECTURE.md promises for a whole store directory: the log's bound, the
    checkpoint (at most the size; two while one replaces the other), the reserve and the
    small files (header, usage, durable mark, lock), a 4 KiB block each at most."""
    reserve = min(8 * MIB, size + MIB)
    return log_bound(size, segment_size) + 2 * (size + 4096) + reserve + 8 * 4096


def disk_use(store: Path) -> int:
    """Bytes of disk the volume's store directory takes (allocated blocks)."""
    total = 0
    for entry in os.scandir(store):
        with contextlib.suppress(FileNotFoundError):  # a checkpoint.tmp renamed meanwhile
            total += entry.stat(follow_symlinks=False).st_blocks * 512
    return total


def _now() -> int:
    return time.time_ns()


def _create(volume: Volume, parent: int, name: bytes, mode: int, target: bytes | None = None):
    inode = volume.new_inode(mode, 0, 0, 0, _now())
    if target is not None:
        inode.target, inode.size = target, len(target)
    volume.create(volume.inodes[parent], name, inode, _now())
    return volume.inodes[inode.ino]


def _counters(volume: Volume) -> dict:
    kept = {
        "extents_in": {s: n for s, n in volume.extents_in.items() if n},
        "extent_count": volume.extent_count,
        "meta_used": volume.meta_used,
        "used": volume.used,
    }
    return {**kept, "charged": volume.charged, "inodes": volume.inodes_used}


def _random_ops(volume: Volume, rng: random.Random, steps: int, tag: bytes) -> None:
    """A mix of every kind of operation, checking the running accounting after each; names
    made start with *tag*."""
    dirs, files, links = [ROOT_INO], [], []
    for step in range(steps):
        choice = rng.random()
        parent = rng.choice(dirs)
        name = tag + b"%d-" % step + b"x" * rng.randrange(0, 40)
        if choice < 0.12 or not files:
            files.append((parent, name, _create(volume, parent, name, stat.S_IFREG | 0o644).ino))
        elif choice < 0.17:
            dirs.append(_create(volume, parent, name, stat.S_IFDIR | 0o755).ino)
        elif choice < 0.22:
            target = rng.randbytes(rng.randrange(1, 300))
            links.append((parent, name, _create(volume, parent, name, stat.S_IFLNK, target).ino))
        elif choice < 0.45:
            _, _, ino = rng.choice(files)
            data = rng.randbytes(rng.choice([1, 100, 4096, 70_000, 300_000]))
            volume.write(volume.inodes[ino], rng.randrange(0, 2 * MIB), data, _now())
        elif choice < 0.52:
            _, _, ino = rng.choice(files)
            volume.set_attrs(volume.inodes[ino], size=rng.randrange(0, MIB), ctime_ns=_now())
        elif choice < 0.62:
            _, _, ino = rng.choice(files + links) if rng.random() < 0.8 else (0, 0, parent)
            inode = volume.inodes[ino]
            xname = b"user.%d" % rng.randrange(4)
            if inode.xattrs and xname in inode.xattrs and rng.random() < 0.4:
                volume.set_xattr(inode, xname, None, _now())
            elif stat.S_ISLNK(inode.mode):
                volume.set_xattr(inode, b"trusted.x", rng.randbytes(rng.randrange(50)), _now())
            else:
                volume.set_xattr(inode, xname, rng.randbytes(rng.randrange(2000)), _now())
        elif choice < 0.68:
            old_parent, old_name, ino = rng.choice(files)
            volume.link(volume.inodes[ino], volume.inodes[parent], name, _now())
            files.append((parent, name, ino))
        elif choice < 0.8:
            entry = rng.choice(files)
            old_parent, old_name, ino = entry
            target = rng.choice(files) if rng.random() < 0.3 else (parent, name, 0)
            if target[:2] == entry[:2]:
                continue
            replaced = volume.inodes[target[2]] if target[2] else None
            volume.rename(volume.inodes[old_parent], old_name, volume.inodes[target[0]],
                          target[1], replaced, _now())  # fmt: skip
            files = [f for f in files if f[:2] not in (entry[:2], target[:2])]
            files.append((target[0], target[1], ino))
        elif files:
            entry = rng.choice(files)
            parent_ino, old_name, ino = entry
            volume.unlink(volume.inodes[parent_ino], old_name, volume.inodes[ino], _now())
            files.remove(entry)
        counted = volume.recount()
        assert {k: v for k, v in _counters(volume).items() if k in counted} == counted


def test_accounting_survives_replay_and_checkpoints(tmp_path):
    """The running figures match a recount after every operation, and a load from the
    checkpoint or from the log alone rebuilds exactly the same."""
    root = StoreRoot(tmp_path / "store")
    volume = root.open_volume("v", segment_size=256 * 1024)
    rng = random.Random(5)
    _random_ops(volume, rng, 400, b"a")
    before = _counters(volume)
    assert before["meta_used"] > 0 and before["extent_count"] > 0
    volume.close(checkpoint=False)  # as if killed: the next load replays the log
    volume = root.open_volume("v")
    assert _counters(volume) == before
    _random_ops(volume, rng, 200, b"b")
    before = _counters(volume)
    volume.close()  # checkpointed: the next load starts from it
    volume = root.open_volume("v")
    assert _counters(volume) == before
    volume.close()


def test_what_each_item_costs(tmp_path):
    volume = StoreRoot(tmp_path / "store").open_volume("v")
    assert volume.used_by_files == 0 and volume.inodes_used == 1  # the root is free
    f = _create(volume, ROOT_INO, b"file", stat.S_IFREG | 0o644)
    assert volume.used_by_files == INODE_COST + ENTRY_COST + 4
    volume.write(f, 0, b"a" * 1000, _now())
    base = volume.used_by_files
    assert base == INODE_COST + ENTRY_COST + 4 + 1000 + EXTENT_COST
    volume.write(f, 0, b"b" * 1000, _now())  # an overwrite of a whole extent: no more
    assert volume.used_by_files == base
    volume.write(f, 100, b"c" * 10, _now())  # inside an extent: it splits in three
    assert volume.used_by_files == base + 2 * EXTENT_COST
    volume.set_xattr(f, b"user.k", b"v" * 50, _now())
    assert volume.used_by_files == base + 2 * EXTENT_COST + XATTR_COST + 6 + 50
    volume.set_xattr(f, b"user.k", None, _now())
    assert volume.used_by_files == base + 2 * EXTENT_COST
    _create(volume, ROOT_INO, b"ln", stat.S_IFLNK | 0o777, b"t" * 4000)
    assert volume.used_by_files == base + 2 * EXTENT_COST + INODE_COST + ENTRY_COST + 2 + 4000
    volume.close()


def _full_volume(tmp_path, size: int = MIB) -> Volume:
    root = StoreRoot(tmp_path / "store")
    root.create_volume("v", size=size)
    volume = root.open_volume("v")
    f = _create(volume, ROOT_INO, b"big", stat.S_IFREG | 0o644)
    with pytest.raises(NoSpace):
        for _ in range(4 * size // 65536):
            volume.write(f, f.size, b"z" * 65536, _now())
    return volume


def test_a_full_volume_refuses_everything_that_adds(tmp_path):
    """ENOSPC for every kind of item, before anything is written to the log."""
    volume = _full_volume(tmp_path)
    f = volume.inodes[volume.inodes[ROOT_INO].entries[b"big"]]
    root = volume.inodes[ROOT_INO]
    name = b"n" * 255
    for _ in range(1000):
        if volume.quota - volume.used_by_files < INODE_COST + ENTRY_COST + len(name):
            break
        _create(volume, ROOT_INO, b"d%d" % volume.next_ino, stat.S_IFDIR | 0o755)
    for _ in range(1000):
        if volume.quota - volume.used_by_files < ENTRY_COST + len(name):
            break
        volume.link(f, root, b"l%d" % volume.next_ino, _now())
        volume.next_ino += 1
    free = volume.quota - volume.used_by_files - XATTR_COST - len(b"user.fill")
    if free >= 0:
        volume.set_xattr(f, b"user.fill", b"f" * free, _now())
    free = volume.quota - volume.used_by_files
    assert 0 <= free < XATTR_COST + len(b"user.fill")
    attempts = [
        lambda: volume.set_xattr(f, b"user.x", b"v" * free, _now()),
        lambda: volume.set_xattr(f, b"user.fill", b"f" * 2000, _now()),  # a larger value
        lambda: _create(volume, ROOT_INO, b"l", stat.S_IFLNK | 0o777, b"t" * 300),
        lambda: _create(volume, ROOT_INO, name, stat.S_IFDIR | 0o755),
        lambda: _create(volume, ROOT_INO, name, stat.S_IFREG | 0o644),
        lambda: _create(volume, ROOT_INO, name, stat.S_IFIFO | 0o644),
        lambda: volume.link(f, root, name, _now()),
        lambda: volume.rename(root, b"big", root, name, None, _now()),  # a longer name
        lambda: volume.write(f, f.size, b"z" * (free + 1), _now()),
        lambda: volume.write(f, 10, b"q", _now()),  # splits an extent in three
    ]
    for attempt in attempts:
        head, figures = volume.log.head, _counters(volume)
        with pytest.raises(NoSpace) as info:
            attempt()
        assert info.value.errno == errno.ENOSPC
        assert volume.log.head == head and _counters(volume) == figures  # nothing journaled
    # What gives space back, or takes none, still works on a full volume.
    volume.write(f, 0, b"o" * 65536, _now())  # an overwrite of a whole extent
    volume.set_attrs(f, mode=stat.S_IFREG | 0o600, ctime_ns=_now())
    volume.rename(root, b"big", root, b"b", None, _now())  # a shorter name
    volume.unlink(root, b"b", f, _now())  # one of its names
    volume.set_attrs(f, size=0, ctime_ns=_now())
    assert volume.used_by_files < volume.quota // 2
    volume.close()


def test_the_inode_limit(tmp_path):
    root = StoreRoot(tmp_path / "store")
    root.create_volume("v", inodes=5)
    volume = root.open_volume("v")
    files = [_create(volume, ROOT_INO, b"f%d" % i, stat.S_IFREG | 0o644) for i in range(3)]
    _create(volume, ROOT_INO, b"d", stat.S_IFDIR | 0o755)
    for mode, target in ((stat.S_IFREG, None), (stat.S_IFDIR, None), (stat.S_IFLNK, b"t"),
                         (stat.S_IFIFO, None)):  # fmt: skip
        with pytest.raises(NoSpace):
            _create(volume, ROOT_INO, b"more", mode | 0o644, target)
    volume.link(files[0], volume.inodes[ROOT_INO], b"hard", _now())  # no inode for a link
    volume.unlink(volume.inodes[ROOT_INO], b"f1", files[1], _now())
    _create(volume, ROOT_INO, b"again", stat.S_IFREG | 0o644)
    assert volume.inodes_used == 5
    volume.close()


def test_limits_change_durably_and_never_below_what_is_held(tmp_path):
    root = StoreRoot(tmp_path / "store")
    root.create_volume("v", size=64 * MIB)
    assert root.header("v")["segment_size"] == segment_size_for(64 * MIB) == 8 * MIB
    volume = root.open_volume("v")
    f = _create(volume, ROOT_INO, b"f", stat.S_IFREG | 0o644)
    volume.write(f, 0, os.urandom(3 * MIB), _now())
    for i in range(3):
        _create(volume, ROOT_INO, b"g%d" % i, stat.S_IFREG | 0o644)
    volume.close()
    with pytest.raises(StoreError, match="cannot be made smaller"):
        root.resize("v", size=2 * MIB)
    with pytest.raises(StoreError, match="inode limit cannot be lower"):
        root.resize("v", inodes=4)
    assert root.header("v")["size"] == 64 * MIB
    header = root.resize("v", size=4 * MIB, inodes=10)
    assert header["size"] == 4 * MIB and header["inodes"] == 10
    assert root.header("v") == header
    assert header["segment_size"] == segment_size_for(4 * MIB) == MIB
    root.resize("v", size=1 << 40)  # larger: the segments stay as small as they were
    assert root.header("v")["segment_size"] == MIB and root.header("v")["inodes"] == 10
    volume = root.open_volume("v")
    assert volume.quota == 1 << 40 and volume.inode_limit == 10
    volume.set_limits(8 * MIB, 0)  # live, as the worker will
    volume.close()
    assert root.header("v")["size"] == 8 * MIB and root.header("v")["inodes"] == 0
    with pytest.raises(StoreError, match="does not exist"):
        root.resize("nope", size=MIB)


def test_fsck_repairs_a_full_volume(store_root):
    """Linking an orphan into /lost+found names a file that is counted already: the repair of
    a full volume is not refused."""
    root = StoreRoot(store_root)
    root.create_volume("v", size=MIB, inodes=4)
    volume = root.open_volume("v")
    folder = _create(volume, ROOT_INO, b"folder", stat.S_IFDIR | 0o755)
    inner = _create(volume, folder.ino, b"inner", stat.S_IFREG | 0o644)
    volume.write(inner, 0, b"still here", _now())
    volume.unlink(volume.inodes[ROOT_INO], b"folder", folder, _now())  # as damage would
    big = _create(volume, ROOT_INO, b"big", stat.S_IFREG | 0o644)
    with pytest.raises(NoSpace):
        for _ in range(20):
            volume.write(big, big.size, b"z" * 65536, _now())
    _create(volume, ROOT_INO, b"last", stat.S_IFIFO | 0o644)
    with pytest.raises(NoSpace):  # no inode left for /lost+found
        _create(volume, ROOT_INO, b"more", stat.S_IFIFO | 0o644)
    volume.close(checkpoint=False)  # replayed, the log leaves "inner" linked from nowhere
    done = volfsd("fsck", "--repair", "v", root=store_root, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"linked as /lost+found/#{inner.ino}" in done.stdout


def test_the_log_stays_within_its_bound_without_housekeeping(tmp_path):
    """Full overwrites of a full volume, and small writes all over it, with no background
    compaction at all: the appends alone keep the log within `log_bound`."""
    volume = _full_volume(tmp_path)
    bound = log_bound(volume.quota, volume.log.segment_size)
    f = volume.inodes[volume.inodes[ROOT_INO].entries[b"big"]]
    rng = random.Random(2)
    for _ in range(40):
        volume.write(f, 0, os.urandom(f.size), _now())
        assert volume.log.total <= bound
    for _ in range(3000):
        try:
            volume.write(f, rng.randrange(f.size), os.urandom(rng.choice([1, 100, 4096])), _now())
        except NoSpace:  # splitting extents takes room too, and the volume is full
            volume.write(f, 0, os.urandom(f.size), _now())
        assert volume.log.total <= bound
        assert volume.log.total == sum(volume.log.sizes().values())
    store = tmp_path / "store" / "volumes" / "v"
    assert disk_use(store) <= store_bound(volume.quota, volume.log.segment_size)
    volume.close()


# -- through real mounts ----------------------------------------------------------------------


def _fill(path: Path, piece: int = 65536) -> int:
    """Write to *path* until the volume is full; return the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as f, pytest.raises(OSError) as info:
        for _ in range((64 << 20) // piece):  # far more than any volume here holds
            written += f.write(b"z" * piece)
    assert info.value.errno == errno.ENOSPC
    return written


def _refused(call, *args) -> None:
    with pytest.raises(OSError) as info:
        call(*args)
    assert info.value.errno == errno.ENOSPC, info.value


def _use_up(path: Path) -> None:
    """Take what room is left with xattrs of ever smaller values: afterwards less than an
    xattr with an empty value (`XATTR_COST` and an 8-byte name) fits."""
    n = 0
    for size in [1 << k for k in range(16, -1, -1)] + [0]:
        for _ in range(100):  # 2 values of each size fill it
            try:
                os.setxattr(path, f"user.{n:03d}", b"u" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
            n += 1
        else:
            pytest.fail(f"{path}: xattrs of {size} bytes never get ENOSPC")


def _ls(volume) -> dict:
    return json.loads(volfsd("inspect", volume.name, root=volume.root).stdout)[0]


def test_xattrs_symlinks_and_names_count_on_a_full_volume(volume):
    """The user trial: a full 1 MiB volume took 200 xattrs of 64 KiB and 200 symlinks with
    4000-byte targets (13 MB more). Now each kind ends in ENOSPC once the size is used,
    and df and ls agree on what is used."""
    mnt = volume.mount(None, "--size", "1M")
    _fill(mnt / "big")
    big = mnt / "big"
    made = 0
    with pytest.raises(OSError) as info:
        for made in range(200):
            os.setxattr(big, f"user.a{made}", b"x" * 65536)
    assert info.value.errno == errno.ENOSPC and made <= 1
    with pytest.raises(OSError) as info:
        for made in range(200):
            os.symlink("t" * 4000, mnt / f"l{made}")
    assert info.value.errno == errno.ENOSPC and made <= 17
    with pytest.raises(OSError) as info:
        for made in range(2000):
            os.mkdir(mnt / f"d{made:04d}".ljust(255, "x"))
    assert info.value.errno == errno.ENOSPC and made < 200
    _use_up(big)
    for call, args in [(os.mkdir, (mnt / "more",)), (os.mkfifo, (mnt / "fifo",)),
                       (os.symlink, ("t", mnt / "s")), (os.link, (big, mnt / "hard-link")),
                       (os.setxattr, (mnt, "user.dir", b"v" * 300))]:  # fmt: skip
        _refused(call, *args)
    _refused(open, mnt / "new", "x")
    st = os.statvfs(mnt)
    assert st.f_blocks * st.f_frsize == MIB and st.f_bavail == 0
    segment = segment_size_for(MIB)
    assert disk_use(volume.store) <= store_bound(MIB, segment) < 13 * MIB  # not 23 MB
    used_blocks = st.f_blocks - st.f_bfree
    deadline = time.monotonic() + 60  # `ls` shows what the worker last reported
    while -(-_ls(volume)["used"] // st.f_frsize) != used_blocks and time.monotonic() < deadline:
        time.sleep(0.2)
    assert -(-_ls(volume)["used"] // st.f_frsize) == used_blocks
    os.unlink(big)  # room comes back
    os.setxattr(mnt, "user.dir", b"v" * 300)


def test_directory_entries_cost_their_names(volume):
    """Each directory costs its inode and its entry, name included: exactly as documented."""
    size = 256 * 1024
    mnt = volume.mount(None, "--size", str(size))
    expected = size // (INODE_COST + ENTRY_COST + 255)
    made = 0
    with pytest.raises(OSError) as info:
        for made in range(2 * expected):
            os.mkdir(mnt / f"d{made:04d}".ljust(255, "x"))
    assert info.value.errno == errno.ENOSPC
    assert made == expected
    os.rmdir(mnt / "d0000".ljust(255, "x"))
    os.mkdir(mnt / "short")  # the space of a removed one is there again


def test_inode_limit_through_a_mount(volume):
    mnt = volume.mount(None, "--inodes", "6")
    st = os.statvfs(mnt)
    assert (st.f_files, st.f_ffree) == (6, 5)  # the root directory is one
    (mnt / "f").write_bytes(b"data")
    os.mkdir(mnt / "d")
    os.symlink("f", mnt / "s")
    os.mkfifo(mnt / "p")
    (mnt / "d" / "g").touch()
    assert os.statvfs(mnt).f_ffree == 0
    for call, args in [(os.mkdir, (mnt / "d2",)), (os.mkfifo, (mnt / "p2",)),
                       (os.symlink, ("f", mnt / "s2")), (open, (mnt / "h", "x"))]:  # fmt: skip
        _refused(call, *args)
    os.link(mnt / "f", mnt / "hard")  # a hard link takes no inode
    os.unlink(mnt / "p")
    assert os.statvfs(mnt).f_ffree == 1
    (mnt / "again").touch()
    info = _ls(volume)
    assert info["inodes_limit"] == 6 and info["size"] == 0
    volume.remount()  # the limit is the volume's, not the mount's
    st = os.statvfs(volume.path)
    assert (st.f_files, st.f_ffree) == (6, 0)


def test_disk_use_stays_within_its_bound_under_overwrites(volume):
    """40 full overwrites of a full 1 MiB volume left 49 MB of store. Now the store stays
    within the bound of ARCHITECTURE.md after every one of them, and the data is intact."""
    mnt = volume.mount(None, "--size", "1M")
    f = mnt / "f"
    data = os.urandom(MIB - 64 * 1024)
    f.write_bytes(data)
    bound = store_bound(MIB, segment_size_for(MIB))
    for n in range(40):
        data = os.urandom(len(data))
        with open(f, "r+b", buffering=0) as out:
            out.write(data)
        assert disk_use(volume.store) <= bound, f"after {n + 1} overwrites"
        segments = sum(p.stat().st_size for p in volume.store.glob("seg-*.log"))
        assert segments <= log_bound(MIB, segment_size_for(MIB))
    assert f.read_bytes() == data
    done = volfsd("scrub", volume.name, "--rate", "0", root=volume.root, check=False)
    assert done.returncode == 0, done.stdout + done.stderr  # checksums, tree and accounting
    volume.unmount()
    done = volfsd("fsck", volume.name, root=volume.root, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert disk_use(volume.store) <= bound


def test_resize(volume):
    mnt = volume.mount(None, "--size", "1M")
    (mnt / "f").write_bytes(b"a" * (600 * 1024))
    with pytest.raises(OSError) as full:
        (mnt / "big").write_bytes(b"c" * MIB)
    assert full.value.errno == errno.ENOSPC
    (mnt / "big").unlink()
    # A mounted volume is resized by its worker, at once: statfs and writes see the new size.
    volfsd("resize", volume.name, "4M", root=volume.root)
    st = os.statvfs(mnt)
    assert st.f_blocks * st.f_frsize == 4 * MIB
    (mnt / "big").write_bytes(b"c" * MIB)
    _one_line(volfsd("resize", volume.name, "1M", root=volume.root, check=False),
              "cannot be made smaller")  # fmt: skip
    (mnt / "big").unlink()
    volume.unmount()
    _one_line(volfsd("resize", volume.name, "512K", root=volume.root, check=False),
              "cannot be made smaller")  # fmt: skip
    volfsd("resize", volume.name, "4M", "--inodes", "50", root=volume.root)  # via the daemon
    info = _ls(volume)
    assert (info["size"], info["inodes_limit"]) == (4 * MIB, 50)
    stop_daemon(run_dir_of(volume.root))
    volfsd("resize", volume.name, "3M", root=volume.root)  # without one: straight on the store
    assert _ls(volume)["size"] == 3 * MIB and _ls(volume)["inodes_limit"] == 50
    mnt = volume.mount()
    st = os.statvfs(mnt)
    assert st.f_blocks * st.f_frsize == 3 * MIB and st.f_files == 50
    (mnt / "g").write_bytes(b"b" * (2 * MIB))
    assert (mnt / "f").read_bytes() == b"a" * (600 * 1024)


def _one_line(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == 1, done
    assert done.stderr.startswith("volfsd: ") and done.stderr.count("\n") == 1, done.stderr
    for word in words:
        assert word in done.stderr, done.stderr


@pytest.mark.parametrize("value", ["0", "-5", "abc", "1.5", "10K", "", "9" * 30, "9" * 5000])
def test_bad_inode_limits_are_one_line(store_root, tmp_path, value):
    for args in (["create", "v", "--inodes", value],
                 ["mount", "v", str(tmp_path / "m"), "--inodes", value],
                 ["resize", "v", "1M", "--inodes", value]):  # fmt: skip
        _one_line(volfsd(*args, root=store_root, check=False), "invalid inode limit")
    assert not (tmp_path / "m").exists() or not os.listdir(tmp_path / "m")


def test_resize_refusals(store_root):
    _one_line(volfsd("resize", "ghost", "1M", root=store_root, check=False), "no such volume")
    volfsd("create", "v", root=store_root)
    _one_line(volfsd("resize", "v", "lots", root=store_root, check=False), "invalid size")
    _one_line(volfsd("resize", "v", root=store_root, check=False), "required")


def test_inodes_in_the_config(tmp_path):
    from volfs.config import load_config
    from volfs.errors import VolfsError

    config = tmp_path / "volumes.toml"
    config.write_text('[volumes.a]\nsize = "1G"\ninodes = 1000\n\n[volumes.b]\n')
    declared = load_config(config).volumes
    assert declared["a"].inodes == 1000 and declared["b"].inodes == 0
    config.write_text("[volumes.a]\ninodes = -1\n")
    with pytest.raises(VolfsError, match="volume 'a': invalid inode limit"):
        load_config(config)
