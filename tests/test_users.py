"""Who uses a mount (volfs.users), through a real volfs mount and real helper processes.

Each helper holds one kind of use (an open file, a working or root directory, a mapping, a
mount namespace of its own) and says "ready" once it does; every helper is killed at the end,
also when the test failed.  Other processes on the host may use the mount too (another mount
namespace made meanwhile copies it), so the tests check that each helper is found as what it
is, and that a helper without a use is not found, never that nothing else is.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from volfs import mounts
from volfs.users import CWD, FD, MMAP, NAMESPACE, ROOT, User, container_id, describe_users, users_of

from helpers import needs_root, wait_until

pytestmark = pytest.mark.mount_namespaces  # unshare -m, chroot
ROOT_ONLY = needs_root("needs root (chroot, unshare, cgroups)")

OPEN = "f = open(sys.argv[1], 'rb')"
CLOSED = "f = open(sys.argv[1], 'rb'); f.read(); f.close()"
#: Mapped with libc's mmap: Python's mmap object keeps a duplicate of the fd open.
MAPPED = (
    "import ctypes; libc = ctypes.CDLL(None); libc.mmap.restype = ctypes.c_void_p\n"
    "libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,"
    " ctypes.c_int, ctypes.c_long]\n"
    "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
    "addr = libc.mmap(None, 65536, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)\n"
    "assert addr not in (None, 2**64 - 1)  # MAP_FAILED\n"
    "os.close(fd)"
)
CHDIR = "os.chdir(sys.argv[1])"
CHROOT = "os.chroot(sys.argv[1])"


@contextlib.contextmanager
def helper(setup: str, arg: Path) -> Iterator[subprocess.Popen]:
    """A Python process that runs *setup* (with *arg* as sys.argv[1]), says so, and waits."""
    code = f"import mmap, os, sys, time\n{setup}\nprint('ready', flush=True)\ntime.sleep(120)\n"
    proc = subprocess.Popen([sys.executable, "-c", code, str(arg)], stdout=subprocess.PIPE,
                            text=True, cwd="/")  # fmt: skip
    try:
        assert proc.stdout.readline() == "ready\n", "the helper did not get ready"
        yield proc
    finally:
        _end(proc)


def _end(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def _uses(users: list[User], pid: int) -> set[str]:
    return {u.what for u in users if u.pid == pid}


@pytest.fixture
def device(mnt: Path) -> str:
    (mnt / "data").write_bytes(b"x" * 65536)
    return mounts.find_mount(mnt).device


def test_open_file_is_found_and_a_closed_one_is_not(mnt, device):
    with helper(OPEN, mnt / "data") as holder, helper(CLOSED, mnt / "data") as done:
        users = users_of(device)
        assert _uses(users, holder.pid) == {FD}
        assert _uses(users, done.pid) == set()
        user = next(u for u in users if u.pid == holder.pid)
        assert user.command == "python3" or user.command.startswith("python")
        assert describe_users([user]) == f"pid {holder.pid} ({user.command}, open file)"
        assert _uses(users_of(device, exclude_pids={holder.pid}), holder.pid) == set()
    assert _uses(users_of(device), holder.pid) == set()  # gone with its process


def test_working_directory_is_found(mnt, device):
    (mnt / "sub").mkdir()
    with helper(CHDIR, mnt / "sub") as proc:
        assert _uses(users_of(device), proc.pid) == {CWD}


@ROOT_ONLY
def test_root_directory_is_found(mnt, device):
    with helper(CHROOT, mnt) as proc:
        # chroot() leaves the working directory where it was: "/" of the host.
        assert _uses(users_of(device), proc.pid) == {ROOT}


def test_mapped_file_is_found(mnt, device):
    with helper(MAPPED, mnt / "data") as proc:
        assert _uses(users_of(device), proc.pid) == {MMAP}  # its fd is closed: the mapping only


def _in_new_namespace() -> subprocess.Popen:
    """`unshare -m --propagation slave sleep`, waited for until it runs in its own namespace."""
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "slave", "sleep", "120"], cwd="/")
    ours = os.readlink("/proc/self/ns/mnt")
    try:
        wait_until(lambda: os.readlink(f"/proc/{proc.pid}/ns/mnt") != ours
                   and Path(f"/proc/{proc.pid}/comm").read_text().strip() == "sleep",
                   "unshare to start sleep in a new mount namespace", interval=0.02,
                   ignore=(OSError,))  # fmt: skip
    except AssertionError:
        _end(proc)
        raise
    return proc


@ROOT_ONLY
@pytest.mark.skipif(shutil.which("unshare") is None, reason="no unshare (util-linux)")
def test_other_mount_namespace_is_a_user(mnt, device):
    """A namespace made after the mount holds a copy of it: a user with no file open."""
    proc = _in_new_namespace()
    try:
        users = users_of(device)
        assert _uses(users, proc.pid) == {NAMESPACE}
        user = next(u for u in users if u.pid == proc.pid)
        assert describe_users([user]) == f"the mount namespace of pid {proc.pid} (sleep)"
    finally:
        _end(proc)
    assert _uses(users_of(device), proc.pid) == set()


@pytest.mark.slow
def test_a_stopped_server_does_not_hang_the_scan(volume, mnt, device):
    """With the serving process stopped and the kernel's attribute cache expired, a stat() of
    /proc/PID/cwd (or of /proc/PID/fd/N) would wait for the server; the scan asks it nothing."""
    from volfs.fsops import CACHE_TIMEOUT

    (mnt / "sub").mkdir()
    code = (
        f"from volfs.users import users_of; print([(u.pid, u.what) for u in users_of({device!r})])"
    )
    with helper(CHDIR, mnt / "sub") as inside, helper(OPEN, mnt / "data") as holder:
        os.kill(volume.pid, signal.SIGSTOP)
        try:
            time.sleep(CACHE_TIMEOUT + 2)  # every attribute the kernel holds has expired
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  timeout=60)  # fmt: skip
        finally:
            os.kill(volume.pid, signal.SIGCONT)
        assert f"({inside.pid}, 'cwd')" in done.stdout, done
        assert f"({holder.pid}, 'fd')" in done.stdout, done


def test_processes_exiting_mid_scan_never_raise(mnt, device):
    churn = subprocess.Popen(["sh", "-c", "while :; do /bin/true; done"], cwd="/")
    try:
        with helper(OPEN, mnt / "data") as holder:
            for _ in range(20):
                assert FD in _uses(users_of(device), holder.pid)
    finally:
        _end(churn)


def test_describe_users():
    users = [
        User(123, "sqlite3", FD, None),
        User(123, "sqlite3", CWD, None),
        User(456, "sh", NAMESPACE, "3f2a1b9c0d1e"),
        User(789, "nginx", MMAP, "aaaaaaaaaaaa"),
        User(1000, "a", FD, None),
        User(1001, "b", FD, None),
    ]
    assert describe_users(users[:3]) == (
        "pid 123 (sqlite3, open file, working directory), container 3f2a1b9c0d1e (pid 456, sh)"
    )
    assert describe_users(users) == (
        "pid 123 (sqlite3, open file, working directory), container 3f2a1b9c0d1e (pid 456, sh), "
        "container aaaaaaaaaaaa (pid 789, nginx, mapped file), and 2 more"
    )
    assert describe_users([]) == ""


ID = "3f2a1b9c0d1e" + "0" * 52


@pytest.mark.parametrize(
    "cgroup,expected",
    [
        (f"0::/system.slice/docker-{ID}.scope\n", ID[:12]),
        (f"12:memory:/docker/{ID}\n11:pids:/docker/{ID}\n", ID[:12]),
        (f"0::/machine.slice/libpod-{ID}.scope/container\n", ID[:12]),
        (f"0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-{ID}.scope\n", ID[:12]),
        (f"0::/kubepods/besteffort/pod1234/{ID}\n", ID[:12]),
        ("0::/user.slice/user-1000.slice/session-2.scope\n", None),
        ("4:memory:/process_api/fa78ad19e230ac0813b671af8ccc0a68\n0::/\n", None),
        (f"0::/x-{ID}0\n", None),  # 65 digits: not an id
    ],
)
def test_container_id(cgroup, expected):
    assert container_id(cgroup) == expected
