"""The pyfuse3 patch series (patches/pyfuse3): each patch's effect, through a real mount.

`volfsd --version` must name the series this checkout carries, so a suite run on a plain
pyfuse3 fails there; the other tests skip, naming the patch, when the installed pyfuse3 lacks
its feature (volfs runs without them), and otherwise fail when the effect is not in force.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from volfs import pyfuse3_build, requests, workerctl

from helpers import volfsd, wait_until

SERIES = Path(__file__).resolve().parent.parent / "patches" / "pyfuse3"
MIB = 1024 * 1024
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_COLLAPSE_RANGE = 0x01, 0x02, 0x08
FALLOC_FL_ZERO_RANGE = 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def needs(feature: str, patch: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        feature not in pyfuse3_build.features(),
        reason=f"the installed pyfuse3 lacks patch {patch} ({feature}): run ./install.sh",
    )


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with any mode (os.posix_fallocate has mode 0 only)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def worker(host, name: str, request: requests.WorkerRequest) -> dict:
    return trio.run(workerctl.call, workerctl.socket_path(host.run, name), request)


def test_version_names_the_series_this_checkout_carries(tmp_path):
    patches = (SERIES / "series").read_text().split()
    digest = hashlib.sha256()
    for name in ["series", *patches]:
        digest.update((SERIES / name).read_bytes())
    expected = f"{len(patches)}.s{digest.hexdigest()[:8]}"
    out = volfsd("--version", root=tmp_path).stdout
    assert f"pyfuse3 3.5.0, patched (volfs series {expected})" in out, out


@needs("capabilities", "0001")
def test_capabilities_are_chosen_at_init(host, tmp_path):
    host.cli("mount", "v", str(tmp_path / "m"))
    os.stat(tmp_path / "m")  # answered only after the kernel's INIT: the capabilities are set
    caps = worker(host, "v", requests.WorkerStatusRequest())["fuse_capabilities"]
    auto_inval = pyfuse3_build.capability("AUTO_INVAL_DATA")
    symlinks = pyfuse3_build.capability("CACHE_SYMLINKS")
    assert caps["offered"] & auto_inval, "the kernel offers AUTO_INVAL_DATA"
    assert not caps["granted"] & auto_inval, "volfs clears it"
    assert caps["granted"] & symlinks == caps["offered"] & symlinks, "and asks for symlinks"
    locks = pyfuse3_build.capability("POSIX_LOCKS") | pyfuse3_build.capability("FLOCK_LOCKS")
    assert not caps["granted"] & locks, "locks stay the kernel's until volfs asks (0005)"
    host.cli("umount", str(tmp_path / "m"))


@needs("capabilities", "0001")
def test_cached_pages_survive_a_write_and_a_stat(host, tmp_path):
    """AUTO_INVAL_DATA cleared: a moved mtime no longer makes the kernel drop the pages it
    holds and read them again (the READ after each stat of the SQLite analysis)."""
    mnt = tmp_path / "m"
    host.cli("mount", "v", str(mnt))
    (mnt / "f").write_bytes(os.urandom(256 * 1024))
    fd = os.open(mnt / "f", os.O_RDWR)
    try:
        assert len(os.pread(fd, 256 * 1024, 0)) == 256 * 1024  # all of it in the page cache
        reads = worker(host, "v", requests.WorkerStatsRequest())["ops"].get("read", 0)
        for i in range(5):
            os.pwrite(fd, b"x" * 4096, i * 8192)  # mtime moves
            os.fstat(fd)  # a GETATTR that sees it
            assert os.pread(fd, 4096, 128 * 1024 + i * 4096) != b"x" * 4096
        after = worker(host, "v", requests.WorkerStatsRequest())["ops"].get("read", 0)
        assert after == reads, f"{after - reads} READ requests for cached pages"
    finally:
        os.close(fd)
    host.cli("umount", str(mnt))


@needs("absent_xattrs", "0006")
def test_the_capability_question_of_writes_is_answered_without_the_handlers(host, tmp_path):
    """Patch 0006: on a volume where no file has capabilities, pyfuse3 answers the GETXATTR
    security.capability that precedes every cached write() itself (the handlers see none);
    once a file is given capabilities, the handlers are asked again and answer."""
    mnt = tmp_path / "m"
    host.cli("mount", "v", str(mnt))

    def getxattrs() -> int:
        return worker(host, "v", requests.WorkerStatsRequest())["ops"].get("getxattr", 0)

    fd = os.open(mnt / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        before = getxattrs()
        for i in range(20):
            os.pwrite(fd, b"x" * 100, i * 100)
        with pytest.raises(OSError) as absent:
            os.getxattr(mnt / "f", "security.capability")
        assert absent.value.errno == errno.ENODATA
        assert getxattrs() == before
        cap = struct.pack("<5I", 0x02000000, 0, 0, 0, 0)  # VFS_CAP_REVISION_2, none permitted
        (mnt / "g").write_bytes(b"")
        os.setxattr(mnt / "g", "security.capability", cap)
        assert os.getxattr(mnt / "g", "security.capability") == cap
        before = getxattrs()
        for i in range(20):
            os.pwrite(fd, b"y" * 100, i * 100)
        assert getxattrs() - before >= 20
    finally:
        os.close(fd)
    host.cli("umount", str(mnt))
    host.cli("mount", "v", str(mnt))  # a volume with capabilities is asked from the start
    assert os.getxattr(mnt / "g", "security.capability") == cap
    host.cli("umount", str(mnt))


def test_the_worker_reads_queued_requests_without_waiting(host, tmp_path):
    """Patch 0007: the worker's /dev/fuse fd is non-blocking, so the session loop reads a
    queued request at once and waits for the fd only on EAGAIN; a flood of requests from
    several processes is answered correctly, and the worker's control channel still answers
    while it lasts (the loop yields every 16 requests)."""
    mnt = tmp_path / "m"
    host.cli("mount", "v", str(mnt))
    pid = worker(host, "v", requests.WorkerStatusRequest())["pid"]
    fds = [fd for fd in os.listdir(f"/proc/{pid}/fd")
           if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse"]  # fmt: skip
    assert fds, "the worker holds /dev/fuse"
    flags = {
        line.split(":")[0]: line.split()[1]
        for line in Path(f"/proc/{pid}/fdinfo/{fds[0]}").read_text().splitlines()
    }
    assert int(flags["flags"], 8) & os.O_NONBLOCK, "0007 makes the session fd non-blocking"

    for i in range(3):
        (mnt / f"f{i}").write_bytes(b"")
        os.setxattr(mnt / f"f{i}", "user.n", str(i).encode())
    flood = [
        subprocess.Popen([sys.executable, "-c", FLOOD, str(mnt / f"f{i}"), str(i)])
        for i in range(3)
    ]

    def getxattrs() -> int:
        return worker(host, "v", requests.WorkerStatsRequest())["ops"].get("getxattr", 0)

    try:
        wait_until(lambda: getxattrs() > 300, what="the flood reaches the worker")
        seen = [getxattrs() for _ in range(5)]  # answered between the flood's requests
        assert seen == sorted(seen)
    finally:
        codes = [p.wait(timeout=120) for p in flood]
    assert codes == [0, 0, 0], "every flooded getxattr had its own file's answer"
    host.cli("umount", str(mnt))


FLOOD = """
import os, sys
for _ in range(3000):
    assert os.getxattr(sys.argv[1], "user.n") == sys.argv[2].encode()
"""


@needs("write_flags", "0002")
def test_a_synchronous_write_syncs_in_the_handler(host, tmp_path):
    mnt = tmp_path / "m"
    host.cli("mount", "v", str(mnt))

    def synced() -> int:
        return worker(host, "v", requests.WorkerStatsRequest())["sync_writes"]

    fd = os.open(mnt / "plain", os.O_WRONLY | os.O_CREAT, 0o644)
    os.pwrite(fd, b"a" * 4096, 0)
    os.close(fd)
    assert synced() == 0
    fd = os.open(mnt / "dsync", os.O_WRONLY | os.O_CREAT | os.O_DSYNC, 0o644)
    os.pwrite(fd, b"b" * 4096, 0)
    os.close(fd)
    assert synced() == 1
    fd = os.open(mnt / "rwf", os.O_WRONLY | os.O_CREAT, 0o644)
    os.pwritev(fd, [b"c" * 4096], 0, os.RWF_DSYNC)
    os.close(fd)
    assert synced() == 2
    fd = os.open(mnt / "sync", os.O_WRONLY | os.O_CREAT | os.O_SYNC, 0o644)
    os.write(fd, b"d" * 100)
    os.close(fd)
    assert synced() == 3
    host.cli("umount", str(mnt))


@needs("fallocate", "0003")
def test_fallocate_allocates_keeps_the_size_and_punches(volume, mnt):
    path = mnt / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fallocate(fd, 0, 0, 2 * MIB)  # allocates and extends
        st = os.fstat(fd)
        assert st.st_size == 2 * MIB and st.st_blocks * 512 >= 2 * MIB
        assert os.pread(fd, 2 * MIB, 0) == bytes(2 * MIB)
        os.pwrite(fd, b"\xff" * (2 * MIB), 0)
        fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 3 * MIB)  # nothing to fill, size kept
        assert os.fstat(fd).st_size == 2 * MIB
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, MIB)
        st = os.fstat(fd)
        assert st.st_size == 2 * MIB
        assert st.st_blocks * 512 <= 2 * MIB - MIB + 4096, "the punched range is freed"
        data = os.pread(fd, 2 * MIB, 0)
        assert data[:4096] == b"\xff" * 4096
        assert data[4096 : 4096 + MIB] == bytes(MIB)
        assert data[4096 + MIB :] == b"\xff" * (MIB - 4096)
        for mode in (FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_ZERO_RANGE, FALLOC_FL_PUNCH_HOLE):
            with pytest.raises(OSError) as info:
                fallocate(fd, mode, 0, 4096)
            assert info.value.errno == errno.EOPNOTSUPP, mode
    finally:
        os.close(fd)
    again = volume.remount()  # the hole and the data around it are in the store
    data = (again / "f").read_bytes()
    assert data == b"\xff" * 4096 + bytes(MIB) + b"\xff" * (MIB - 4096)


@needs("fallocate", "0003")
def test_fallocate_counts_against_the_size(host, tmp_path):
    mnt = tmp_path / "m"
    host.cli("mount", "v", str(mnt), "--size", "4M")
    fd = os.open(mnt / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with pytest.raises(OSError) as info:
            fallocate(fd, 0, 0, 8 * MIB)
        assert info.value.errno == errno.ENOSPC
        assert os.fstat(fd).st_size == 0, "a refused allocation writes nothing"
        fallocate(fd, 0, 0, 2 * MIB)
        with pytest.raises(OSError) as info:  # past the size: checked, though not held
            fallocate(fd, FALLOC_FL_KEEP_SIZE, 2 * MIB, 4 * MIB)
        assert info.value.errno == errno.ENOSPC
        assert os.fstat(fd).st_size == 2 * MIB
    finally:
        os.close(fd)
    host.cli("umount", str(mnt))


@needs("lseek", "0004")
def test_seek_data_and_seek_hole_follow_the_chunk_map(mnt):
    path = mnt / "sparse"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"a" * 4096, 0)
        os.pwrite(fd, b"b" * 4096, 3 * MIB)
        size = 3 * MIB + 4096
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 4096
        assert os.lseek(fd, 4096, os.SEEK_DATA) == 3 * MIB
        assert os.lseek(fd, 3 * MIB, os.SEEK_HOLE) == size  # the end counts as a hole
        assert os.lseek(fd, 100, os.SEEK_DATA) == 100
        with pytest.raises(OSError) as info:
            os.lseek(fd, size, os.SEEK_DATA)
        assert info.value.errno == errno.ENXIO
        os.truncate(fd, 4 * MIB)  # a hole at the end: no data after 3 MiB + 4 KiB
        with pytest.raises(OSError) as info:
            os.lseek(fd, size, os.SEEK_DATA)
        assert info.value.errno == errno.ENXIO
        if "fallocate" in pyfuse3_build.features():  # a punched hole is a hole
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)
            assert os.lseek(fd, 0, os.SEEK_DATA) == 3 * MIB
    finally:
        os.close(fd)


# -- 0005: lock handlers, through tests/lockfs.py (volfs does not take locks over yet) --------

LOCKFS = Path(__file__).resolve().parent / "lockfs.py"
#: A process that waits for the lock on FILE and says what happened: interrupted by an alarm
#: after 1 s when asked (an exception from the handler ends the wait: EINTR), then granted.
WAITER = """
import fcntl, os, signal, sys
fd = os.open(sys.argv[1], os.O_RDWR)
class Alarm(Exception): pass
def ring(*_): raise Alarm()
if sys.argv[2] == "interrupt":
    signal.signal(signal.SIGALRM, ring)
    signal.alarm(1)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        print("granted while held", flush=True)
    except Alarm:
        print("interrupted", flush=True)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("granted", flush=True)
"""


@pytest.fixture
def lockfs(tmp_path):
    """tests/lockfs.py mounted at a path of the test's own; unmounted and ended after."""
    mnt = tmp_path / "lockfs"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, str(LOCKFS), str(mnt)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        yield mnt
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def table(mnt: Path) -> list[list[str]]:
    return [line.split() for line in (mnt / "locks").read_text().splitlines()]


@needs("locks", "0005")
def test_posix_locks_reach_the_file_system(lockfs):
    fd = os.open(lockfs / "f", os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX, 10, 100)  # 10 bytes at 100
        assert [row[0] for row in table(lockfs)] == ["posix"], "the handler took the lock"
        probe = subprocess.run(
            [sys.executable, "-c", PROBE, str(lockfs / "f")], capture_output=True, text=True
        )
        assert probe.stdout.split() == ["EAGAIN", str(fcntl.F_WRLCK), "100", "10", str(os.getpid())]
    finally:
        os.close(fd)
    assert table(lockfs) == [], "a close drops its owner's locks (release_locks at FLUSH)"


PROBE = """
import errno, fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 0, 0)
except OSError as exc:
    print(errno.errorcode[exc.errno])
held = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 105, 1, 0))
kind, _, start, length, pid = struct.unpack("hhqqi", held)
print(kind, start, length, pid)
"""


@needs("locks", "0005")
def test_a_waiting_setlkw_leaves_the_file_system_serving_and_can_be_interrupted(lockfs):
    fd = os.open(lockfs / "f", os.O_RDWR)
    waiter = subprocess.Popen(
        [sys.executable, "-c", WAITER, str(lockfs / "f"), "interrupt"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        assert waiter.stdout is not None
        wait_until(lambda: ["waiting"] in [row[:1] for row in table(lockfs)], "the waiter waiting")
        # One reading task (max_tasks=1), and it still answers while the waiter waits.
        assert os.stat(lockfs / "f").st_size == 0
        assert waiter.stdout.readline() == "interrupted\n", "the alarm ends the wait: EINTR"
        wait_until(lambda: ["waiting"] in [row[:1] for row in table(lockfs)], "the waiter again")
        os.close(fd)  # releases the lock: the waiter gets it
        fd = -1
        assert waiter.stdout.readline() == "granted\n"
        assert waiter.wait(10) == 0
    finally:
        if fd >= 0:
            os.close(fd)
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert table(lockfs) == []


@needs("locks", "0005")
def test_flock_reaches_the_file_system(lockfs):
    first, second = os.open(lockfs / "f", os.O_RDWR), os.open(lockfs / "f", os.O_RDWR)
    try:
        fcntl.flock(first, fcntl.LOCK_EX)
        assert [row[0] for row in table(lockfs)] == ["flock"]
        with pytest.raises(BlockingIOError):
            fcntl.flock(second, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(first)  # the last close of that open file drops its flock lock
        first = -1
        assert table(lockfs) == []
        fcntl.flock(second, fcntl.LOCK_SH | fcntl.LOCK_NB)
    finally:
        for fd in (first, second):
            if fd >= 0:
                os.close(fd)
