"""The daemon and its CLI through real mounts: volumes, shared paths, quotas, healing, systemd."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import pytest

from volfs import mounts

from conftest import _wait_gone, stop_daemon

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")


class Host:
    """A store root and runtime dir of our own, and the CLI pointed at them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = tmp / "store"
        self.run = tmp / "run"
        self.env = {**os.environ, "VOLFS_ROOT": str(self.root), "VOLFS_RUN_DIR": str(self.run)}

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "volfs", *args], env=self.env,
                              capture_output=True, text=True, timeout=180)  # fmt: skip
        if check:
            assert done.returncode == 0, f"volfsd {' '.join(args)}: {done.stderr}"
        return done

    def refused(self, *args: str, words: tuple[str, ...] = ()) -> str:
        done = self.cli(*args, check=False)
        assert done.returncode == 1, done
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("volfsd: "), done.stderr
        for word in words:
            assert word in done.stderr, done.stderr
        return done.stderr

    def daemon_pid(self) -> int:
        return int((self.run / "volfsd.pid").read_text().split()[0])

    def worker_pid(self, name: str) -> int:
        return int((self.root / "volumes" / name / "lock").read_text().split()[0])

    def request(self, raw: bytes, timeout: float = 10) -> dict | None:
        """Send raw bytes to the control socket; return the decoded reply, if any."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.run / "volfsd.sock"))
            sock.sendall(raw)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        if len(data) < 4:
            return None
        return msgpack.unpackb(data[4:], raw=False)

    def cleanup(self) -> None:
        daemon = stop_daemon(self.run)
        for entry in mounts.volfs_mounts():
            if entry.mountpoint.startswith(str(self.tmp)):
                mounts.detach(entry.mountpoint, lazy=True)
        if daemon:
            _wait_gone(daemon, 10)


@pytest.fixture
def host(tmp_path):
    h = Host(tmp_path)
    try:
        yield h
    finally:
        h.cleanup()


def frame(message) -> bytes:
    body = msgpack.packb(message)
    return struct.pack(">I", len(body)) + body


# -- the CLI ------------------------------------------------------------------------------------


def test_create_ls_inspect_rm(host, tmp_path):
    host.cli("create", "alpha", "--size", "512M", "--label", "team=media")
    host.cli("create", "alpha", "--size", "512M", "--label", "team=media")  # same: no-op
    host.refused("create", "alpha", "--size", "1G", words=("already exists",))
    host.cli("create", "beta")
    assert host.cli("ls", "-q").stdout.split() == ["alpha", "beta"]
    table = host.cli("ls").stdout.splitlines()
    assert table[0].split() == ["NAME", "SIZE", "USED", "MOUNTS", "STATUS", "CREATED"]
    assert table[1].split()[:5] == ["alpha", "512M", "0", "-", "unmounted"]
    rows = [json.loads(line) for line in host.cli("ls", "--format", "json").stdout.splitlines()]
    assert {r["name"] for r in rows} == {"alpha", "beta"}
    for row in rows:
        assert {"name", "size", "used", "mounts", "status", "created"} <= set(row)
    alpha = json.loads(host.cli("inspect", "alpha").stdout)
    assert isinstance(alpha, list) and alpha[0]["size"] == 512 << 20
    assert alpha[0]["labels"] == {"team": "media"}
    host.refused("inspect", "alpha", "nope", words=("no such volume: nope",))
    host.cli("mount", "alpha", str(tmp_path / "a"))
    (tmp_path / "a" / "f").write_bytes(b"data")
    host.cli("create", "gamma", "--size", "1G", "--label", "k=v")  # through the daemon now
    host.refused("create", "gamma", "--size", "2G", words=("already exists",))
    assert json.loads(host.cli("inspect", "gamma").stdout)[0]["size"] == 1 << 30
    host.cli("rm", "gamma")
    assert json.loads(host.cli("inspect", "alpha").stdout)[0]["mounts"] == [str(tmp_path / "a")]
    host.refused("rm", "alpha", words=("mounted", "--force"))
    host.cli("rm", "--force", "alpha")
    assert mounts.find_mount(tmp_path / "a") is None
    assert host.cli("ls", "-q").stdout.split() == ["beta"]
    host.refused("rm", "alpha", words=("no such volume",))
    host.cli("mount", "alpha", str(tmp_path / "a2"))  # a new, empty volume of the same name
    assert os.listdir(tmp_path / "a2") == []


def test_cli_refusals(host, tmp_path):
    host.refused("status", words=("not running",))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    host.refused("mount", "v", "relative", words=("absolute",))
    host.refused("mount", "v", str(tmp_path / "full"), words=("not empty",))
    host.refused("mount", "--", "Bad/Name", str(tmp_path / "m"), words=("invalid volume name",))
    host.refused("mount", "v", str(tmp_path / "m"), "--size", "lots", words=("invalid size",))
    host.refused("create", "v", "--label", "novalue", words=("KEY=VALUE",))
    host.refused("create", "x" * 10_000, words=("invalid volume name",))
    host.refused("umount", str(tmp_path), words=("not a volfs mount",))
    host.refused("inspect", "ghost", words=("no such volume",))
    host.refused("frobnicate", words=("invalid choice",))
    host.cli("mount", "v", str(tmp_path / "m"))
    host.cli("mount", "v", str(tmp_path / "m"))  # the same again: nothing to do
    host.refused("mount", "--ro", "v", str(tmp_path / "m"), words=("already mounted",))
    host.refused("mount", "w", str(tmp_path / "m"), words=("already a mount point",))
    host.refused("mount", "v", str(tmp_path / "m2"), "--size", "1G", words=("size",))
    status = json.loads(host.cli("status").stdout)
    assert status["pid"] == host.daemon_pid() and "v" in status["volumes"]


SIZES = [("512M", 512 << 20), ("10G", 10 << 30), ("1T", 1 << 40), ("4096", 4096), ("1.5G", 3 << 29)]


@pytest.mark.parametrize("size,expected", SIZES)
def test_sizes(size, expected):
    from volfs.volumes import parse_size

    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["", "0", "-1G", "10X", "G", "1e999", "1e3", "20000000T"])
def test_bad_sizes(size):
    from volfs.errors import VolfsError
    from volfs.volumes import parse_size

    with pytest.raises(VolfsError):
        parse_size(size)


def test_store_limits_are_one_line_errors(host, tmp_path):
    host.refused("create", "huge", "--size", "20000000T", words=("too large",))
    host.refused("create", "wordy", "--label", "k=" + "a" * 70_000, words=("labels",))
    host.refused("create", "blank", "--size", "", words=("invalid size",))
    host.cli("mount", "v", str(tmp_path / "m"))  # from here on, through the daemon
    host.refused("create", "huge", "--size", "20000000T", words=("too large",))
    host.refused("create", "wordy", "--label", "k=" + "a" * 70_000, words=("labels",))
    assert host.cli("ls", "-q").stdout.split() == ["v"]  # nothing half-made was left


def test_ls_survives_a_damaged_volume(host, tmp_path):
    host.cli("create", "good")
    host.cli("create", "bad")
    (host.root / "volumes" / "bad" / "volume").write_bytes(b"garbage" * 10)
    rows = {}
    for line in host.cli("ls", "--format", "json").stdout.splitlines():
        row = json.loads(line)
        rows[row["name"]] = row
    assert rows["good"]["status"] == "unmounted"
    assert rows["bad"]["status"].startswith("damaged")
    host.cli("rm", "bad")
    assert host.cli("ls", "-q").stdout.split() == ["good"]


@ROOT_ONLY
def test_symlinked_mountpoint(host, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    host.cli("mount", "v", str(tmp_path / "link"))
    (tmp_path / "link" / "f").write_bytes(b"x")
    row = json.loads(host.cli("ls", "--format", "json").stdout)
    assert row["mounts"] == [str(real)]
    host.cli("umount", str(tmp_path / "link"))
    assert mounts.find_mount(real) is None
    host.cli("rm", "v")


# -- sharing -------------------------------------------------------------------------------------


@ROOT_ONLY
def test_two_paths_one_file_system(host, tmp_path):
    a, b = tmp_path / "svc1" / "photos", tmp_path / "svc2" / "app" / "photos"
    host.cli("mount", "photos", str(a))
    host.cli("mount", "photos", str(b))
    (a / "one").write_bytes(b"written through a")
    assert (b / "one").read_bytes() == b"written through a"
    os.rename(b / "one", b / "two")
    assert not (a / "one").exists() and (a / "two").read_bytes() == b"written through a"
    with open(a / "two", "ab") as f:
        f.write(b"!")
    assert (b / "two").read_bytes() == b"written through a!"
    os.unlink(a / "two")
    assert not (b / "two").exists()
    # POSIX (fcntl) and flock locks taken through one path hold against the other.
    with open(a / "lockfile", "w") as fa, open(b / "lockfile", "w") as fb:
        fcntl.lockf(fa, fcntl.LOCK_EX)
        _in_other_process_lock_fails(b / "lockfile", "lockf")
        fcntl.lockf(fa, fcntl.LOCK_UN)
        fcntl.flock(fb, fcntl.LOCK_EX)
        _in_other_process_lock_fails(a / "lockfile", "flock")
    # Unmounting one path leaves the other (and the data) alone.
    host.cli("umount", str(a))
    assert mounts.find_mount(a) is None
    (b / "after").write_bytes(b"still here")
    host.cli("umount", str(b))
    assert not _alive_worker(host, "photos")
    host.cli("mount", "photos", str(a))
    assert (a / "after").read_bytes() == b"still here"


def _alive_worker(host: Host, name: str) -> bool:
    return host.cli("ls", "--format", "json").stdout.count('"status": "mounted"') > 0


def _in_other_process_lock_fails(path: Path, kind: str) -> None:
    code = (
        "import fcntl, sys\n"
        f"f = open({str(path)!r}, 'w')\n"
        "try:\n"
        f"    fcntl.{kind}(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "except OSError:\n"
        "    sys.exit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], timeout=30)
    assert done.returncode == 3, f"{kind} lock through the other path was not refused"


@ROOT_ONLY
def test_sqlite_through_two_paths(host, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    host.cli("mount", "db", str(a))
    host.cli("mount", "db", str(b))
    db = sqlite3.connect(a / "shared.db")
    db.execute("create table t (writer text, n integer)")
    db.commit()
    db.close()
    code = (
        "import sqlite3, sys\n"
        "db = sqlite3.connect(sys.argv[1], timeout=60)\n"
        "for n in range(200):\n"
        "    with db:\n"
        "        db.execute('insert into t values (?, ?)', (sys.argv[2], n))\n"
    )
    writers = [subprocess.Popen([sys.executable, "-c", code, str(p / "shared.db"), p.name])
               for p in (a, b)]  # fmt: skip
    try:
        for w in writers:
            assert w.wait(timeout=300) == 0
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.wait()
    db = sqlite3.connect(b / "shared.db")
    try:
        assert db.execute("pragma integrity_check").fetchone() == ("ok",)
        counts = dict(db.execute("select writer, count(*) from t group by writer"))
        assert counts == {"a": 200, "b": 200}
    finally:
        db.close()


@ROOT_ONLY
def test_container_stand_in(host):
    """Another uid in its own mount namespace, through a bind of the volume, gets mode checks."""
    outer = Path(tempfile.mkdtemp(prefix="volfs-ctr-"))
    outer.chmod(0o755)
    try:
        vol = outer / "vol"
        host.cli("mount", "shared", str(vol))
        os.chmod(vol, 0o755)
        (vol / "open").mkdir(mode=0o777)
        os.chmod(vol / "open", 0o777)
        (vol / "secret").write_text("root only")
        os.chmod(vol / "secret", 0o600)
        inner = outer / "container-view"
        inner.mkdir()
        script = (
            f"mount --bind {vol} {inner} && "
            f"setpriv --reuid=65534 --regid=65534 --clear-groups sh -c '"
            f"echo hi > {inner}/open/mine && echo wrote; "
            f"cat {inner}/secret 2>/dev/null || echo denied-read; "
            f"touch {inner}/toplevel 2>/dev/null || echo denied-write'"
        )
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               script], capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.stdout.split() == ["wrote", "denied-read", "denied-write"], done
        st = os.stat(vol / "open" / "mine")
        assert (st.st_uid, st.st_gid) == (65534, 65534)
        assert not (vol / "toplevel").exists()
        assert mounts.find_mount(inner) is None  # the bind lived only in that namespace
    finally:
        host.cleanup()
        shutil.rmtree(outer, ignore_errors=True)


def test_read_only_mount(host, tmp_path):
    host.cli("mount", "data", str(tmp_path / "rw"))
    (tmp_path / "rw" / "f").write_bytes(b"x")
    if os.geteuid() != 0:
        pytest.skip("a second (read-only) path needs bind mounts")
    host.cli("mount", "--ro", "data", str(tmp_path / "ro"))
    assert (tmp_path / "ro" / "f").read_bytes() == b"x"
    with pytest.raises(OSError) as info:
        (tmp_path / "ro" / "g").write_bytes(b"y")
    assert info.value.errno == errno.EROFS
    assert "ro" in mounts.find_mount(tmp_path / "ro").options.split(",")


# -- quotas ---------------------------------------------------------------------------------------


def test_quota(host, tmp_path):
    mnt = tmp_path / "q"
    host.cli("mount", "small", str(mnt), "--size", "4M")
    st = os.statvfs(mnt)
    assert st.f_blocks * st.f_frsize == 4 << 20
    free_before = st.f_bavail * st.f_frsize
    written = 0
    with open(mnt / "big", "wb", buffering=0) as f, pytest.raises(OSError) as info:
        while True:
            written += f.write(b"z" * 65536)
    assert info.value.errno == errno.ENOSPC
    # The file's inode, name and extents count too (test_quota.py has the details), so the
    # last 64 KiB does not fit.
    assert 4 << 20 > written >= (4 << 20) - 65536
    assert os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize < free_before
    with open(mnt / "big", "r+b") as f:  # overwriting in place needs no new space
        f.write(b"y" * 65536)
    row = json.loads(host.cli("ls", "--format", "json").stdout.splitlines()[0])
    assert row["size"] == 4 << 20
    os.unlink(mnt / "big")
    st = os.statvfs(mnt)
    assert st.f_bavail * st.f_frsize == 4 << 20
    (mnt / "again").write_bytes(b"a" * (3 << 20))
    deadline = time.monotonic() + 10  # `ls` shows what the worker last reported
    while time.monotonic() < deadline:
        row = json.loads(host.cli("ls", "--format", "json").stdout.splitlines()[0])
        if 3 << 20 < row["used"] < (3 << 20) + 4096:  # the data, and its metadata
            break
        time.sleep(0.3)
    assert 3 << 20 < row["used"] < (3 << 20) + 4096


# -- healing, signals, hostile clients ---------------------------------------------------------


@ROOT_ONLY
def test_killed_worker_comes_back_at_every_path(host, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    host.cli("mount", "heal", str(a))
    host.cli("mount", "heal", str(b))
    fd = os.open(a / "f", os.O_CREAT | os.O_WRONLY)
    os.write(fd, b"acknowledged")
    os.kill(host.worker_pid("heal"), signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.close(fd)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if (a / "f").read_bytes() == b"acknowledged" == (b / "f").read_bytes():
                break
        except OSError:
            pass
        time.sleep(0.1)
    else:
        raise AssertionError("the volume did not come back at both paths")
    (b / "g").write_bytes(b"new worker")
    assert (a / "g").read_bytes() == b"new worker"
    status = json.loads(host.cli("status").stdout)
    assert status["volumes"]["heal"]["restarts"] == 1
    assert "worker exited" in (host.root / "logs" / "volfsd.log").read_text()


def test_worker_lives_past_idle_daemon_threads(host, tmp_path):
    """trio retires the thread that started a worker after 10 idle seconds: the worker stays."""
    host.cli("mount", "steady", str(tmp_path / "m"))
    pid = host.worker_pid("steady")
    time.sleep(12)
    (tmp_path / "m" / "f").write_bytes(b"same worker")
    assert host.worker_pid("steady") == pid
    assert json.loads(host.cli("status").stdout)["volumes"]["steady"]["restarts"] == 0


def test_workers_end_with_the_daemon(host, tmp_path):
    """A daemon killed with SIGKILL takes its workers down cleanly; the next mount recovers."""
    mnt = tmp_path / "m"
    host.cli("mount", "orphan", str(mnt))
    (mnt / "f").write_bytes(b"acknowledged")
    worker = host.worker_pid("orphan")
    os.kill(host.daemon_pid(), signal.SIGKILL)
    assert _wait_gone(worker, 15), "the worker outlived its daemon"
    host.cli("mount", "orphan", str(mnt))  # clears the dead mount left at the path
    assert (mnt / "f").read_bytes() == b"acknowledged"


def test_requested_mounts_come_back_after_a_daemon_restart(host, tmp_path):
    a, b = tmp_path / "a", tmp_path / "gone"
    host.cli("mount", "kept", str(a))
    host.cli("mount", "other", str(b))
    host.cli("umount", str(b))  # unmounted on purpose: stays unmounted
    (a / "f").write_bytes(b"still mounted")
    daemon = host.daemon_pid()
    os.kill(daemon, signal.SIGTERM)
    assert _wait_gone(daemon, 60)
    assert mounts.find_mount(a) is None
    host.cli("mount", "third", str(tmp_path / "c"))  # starts a new daemon
    assert (a / "f").read_bytes() == b"still mounted"
    assert mounts.find_mount(b) is None


def test_hostile_control_frames(host, tmp_path):
    host.cli("mount", "steady", str(tmp_path / "m"))
    (tmp_path / "m" / "f").write_bytes(b"unchanged")
    rng = random.Random(5)
    hostile = [
        b"",
        b"\x00",
        struct.pack(">I", 10) + b"abc",  # truncated
        struct.pack(">I", 1 << 30),  # oversized
        struct.pack(">I", 5) + rng.randbytes(5),
        frame([1, 2, 3]),
        frame({"cmd": 7}),
        frame({"cmd": "nope"}),
        frame({"cmd": "ls", "args": [1]}),
        frame({"cmd": "rm", "args": {"name": 5}}),
        frame({"cmd": "rm", "args": {"name": "../../etc"}}),
        frame({"cmd": "mount", "args": {"name": "x", "mountpoint": "rel"}}),
        frame({"cmd": "mount", "args": {"name": "x", "mountpoint": "/a\x00b"}}),
        frame({"cmd": "inspect", "args": {"names": "steady"}}),
        frame({"cmd": "umount", "args": {"mountpoint": "/", "extra": 1}}),
        frame({"cmd": "create", "args": {"name": "y", "labels": {"k": 1}}}),
        frame({"cmd": "create", "args": {"name": "y", "size": True}}),
        frame({"cmd": "mount", "args": {"name": "z", "mountpoint": "/tmp/x", "size": [1]}}),
        *[rng.randbytes(rng.randrange(1, 200)) for _ in range(30)],
        *[frame(rng.randbytes(rng.randrange(1, 100))) for _ in range(30)],
    ]
    for raw in hostile:
        reply = host.request(raw)
        assert reply is not None and reply["ok"] is False, (raw[:40], reply)
    assert host.request(frame({"cmd": "status", "args": {}}))["ok"] is True
    assert (tmp_path / "m" / "f").read_bytes() == b"unchanged"
    assert host.cli("ls", "-q").stdout.split() == ["steady"]


def test_second_serve_refused(host, tmp_path):
    host.cli("mount", "v", str(tmp_path / "m"))
    done = host.cli("serve", check=False)
    assert done.returncode == 1 and "already serves" in done.stderr, done.stderr
    assert json.loads(host.cli("status").stdout)["pid"] == host.daemon_pid()


def test_socket_and_store_modes(host, tmp_path):
    host.cli("mount", "v", str(tmp_path / "m"))
    assert (host.run / "volfsd.sock").stat().st_mode & 0o777 == 0o600
    assert host.run.stat().st_mode & 0o777 == 0o700
    assert host.root.stat().st_mode & 0o777 == 0o700


def test_sigterm_unmounts_everything(host, tmp_path):
    host.cli("mount", "one", str(tmp_path / "one"))
    host.cli("mount", "two", str(tmp_path / "two"))
    (tmp_path / "two" / "f").write_bytes(b"flushed")
    pid = host.daemon_pid()
    workers = [host.worker_pid("one"), host.worker_pid("two")]
    os.kill(pid, signal.SIGTERM)
    assert _wait_gone(pid, 60)
    assert all(_wait_gone(w, 10) for w in workers)
    assert not [m for m in mounts.volfs_mounts() if m.mountpoint.startswith(str(tmp_path))]
    host.cli("mount", "two", str(tmp_path / "again"))
    assert (tmp_path / "again" / "f").read_bytes() == b"flushed"


@ROOT_ONLY
def test_daemon_and_worker_killed_together(host, tmp_path):
    """What the OOM killer or a `kill -9` of the whole service leaves: dead mounts whose
    attributes the kernel still caches.  The next daemon clears them and mounts again."""
    a, b = tmp_path / "a", tmp_path / "b"
    host.cli("mount", "v", str(a))
    host.cli("mount", "v", str(b))
    (a / "f").write_bytes(b"acknowledged")
    os.stat(a), os.stat(b)  # cached in the kernel: a stat of a dead mount would still answer
    for pid in (host.daemon_pid(), host.worker_pid("v")):
        os.kill(pid, signal.SIGKILL)
        assert _wait_gone(pid, 30)
    with pytest.raises(OSError) as info:
        os.listdir(a)
    assert info.value.errno == errno.ENOTCONN
    host.cli("mount", "v", str(a))  # starts a daemon, which brings back both paths
    assert (a / "f").read_bytes() == b"acknowledged"
    assert (b / "f").read_bytes() == b"acknowledged"


@ROOT_ONLY
def test_path_unmounted_behind_our_back(host, tmp_path):
    e1, e2 = tmp_path / "e1", tmp_path / "e2"
    host.cli("mount", "v", str(e1))
    host.cli("mount", "v", str(e2))
    (e2 / "f").write_bytes(b"kept")
    subprocess.run(["umount", str(e1)], check=True)
    host.cli("umount", str(e1))  # already gone: the daemon lets go of it
    assert (e2 / "f").read_bytes() == b"kept"
    subprocess.run(["umount", str(e2)], check=True)
    pid = host.daemon_pid()
    os.kill(pid, signal.SIGTERM)
    assert _wait_gone(pid, 60)
    assert not [m for m in mounts.volfs_mounts() if m.mountpoint.startswith(str(tmp_path))]
    log = (host.root / "logs" / "volfsd.log").read_text()
    assert "Traceback" not in log and "unmounted behind volfsd's back" in log


def test_lazy_unmount_of_a_busy_volume(host, tmp_path):
    """A lazily unmounted volume with an open file is served until it is closed, and the
    daemon goes on serving everyone else meanwhile."""
    busy, other = tmp_path / "busy", tmp_path / "other"
    host.cli("mount", "busy", str(busy))
    host.cli("mount", "other", str(other))
    f = open(busy / "open", "wb", buffering=0)  # noqa: SIM115
    try:
        f.write(b"before ")
        host.refused("umount", str(busy), words=("busy", "--lazy"))
        host.cli("umount", "--lazy", str(busy))
        assert mounts.find_mount(busy) is None
        f.write(b"after")  # still served: nothing written through it is lost
        host.refused("mount", "busy", str(tmp_path / "again"), words=("still being unmounted",))
        os.kill(host.worker_pid("other"), signal.SIGKILL)  # healing does not wait for "busy"
        _wait_for(lambda: (other / "probe").write_bytes(b"ok") == 2)
        host.cli("mount", "third", str(tmp_path / "third"))
    finally:
        f.close()
    _wait_for(lambda: not host.root.joinpath("volumes", "busy", "lock").exists()
              or not _served(host, "busy"))  # fmt: skip
    host.cli("mount", "busy", str(tmp_path / "again"))
    assert (tmp_path / "again" / "open").read_bytes() == b"before after"


def _served(host, name: str) -> bool:
    from volfs.store import pidlock

    return pidlock.is_held(host.root / "volumes" / name / "lock")


def _wait_for(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            if condition():
                return
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# -- config and systemd ------------------------------------------------------------------------


def _notify_socket(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(60)
    return sock, path


def test_config_notify_and_restart(host, tmp_path):
    config = tmp_path / "volumes.toml"
    a, b, c = tmp_path / "srv" / "a", tmp_path / "srv" / "b", tmp_path / "srv" / "c"
    paths = f'["{a}", "{b}"]' if os.geteuid() == 0 else f'["{a}"]'
    config.write_text(
        f'[volumes.declared]\npaths = {paths}\nsize = "64M"\n\n'
        f'[volumes.other]\npaths = ["{c}"]\nlabels = {{ team = "ci" }}\n'
    )
    notify, notify_path = _notify_socket(tmp_path)
    env = {**host.env, "NOTIFY_SOCKET": notify_path}
    for round_ in range(2):  # a restarted daemon brings the declared mounts back
        proc = subprocess.Popen([sys.executable, "-m", "volfs", "serve", "--config", str(config)],
                                env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert notify.recv(4096) == b"READY=1"
            assert mounts.find_mount(a) is not None and mounts.find_mount(c) is not None
            if round_ == 0:
                (a / "f").write_bytes(b"declared")
            assert (a / "f").read_bytes() == b"declared"
            rows = {r["name"]: r for r in map(json.loads, host.cli("ls", "--format", "json")
                                              .stdout.splitlines())}  # fmt: skip
            assert rows["declared"]["size"] == 64 << 20
            assert rows["other"]["labels"] == {"team": "ci"}
            proc.send_signal(signal.SIGTERM)
            assert notify.recv(4096) == b"STOPPING=1"
            assert proc.wait(timeout=120) == 0
            assert mounts.find_mount(a) is None and mounts.find_mount(c) is None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    notify.close()


def test_bad_config_is_one_line(host, tmp_path):
    config = tmp_path / "bad.toml"
    for text, words in [("[volumes.x\n", "not valid TOML"),
                        ('[volumes.x]\npaths = ["rel"]\n', "absolute"),
                        ('[volumes."Bad Name"]\n', "invalid volume name"),
                        ("[volumes.x]\nsize = 5\ncolour = 1\n", "allowed keys"),
                        ("[other]\n", "expected only")]:  # fmt: skip
        config.write_text(text)
        host.refused("serve", "--config", str(config), words=(words,))
    host.refused("serve", "--config", str(tmp_path / "missing.toml"), words=("does not exist",))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_unit_verifies(tmp_path):
    unit = (Path(__file__).parent.parent / "systemd" / "volfsd.service").read_text()
    fake = tmp_path / "volfsd"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    (tmp_path / "volfsd.service").write_text(unit.replace("/usr/local/bin/volfsd", str(fake)))
    done = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "volfsd.service")],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.stderr.strip() == "", done.stderr
    assert "Type=notify" in unit and "Before=docker.service" in unit
    settings = "\n".join(line for line in unit.splitlines() if not line.startswith("#"))
    for forbidden in ("PrivateTmp", "ProtectSystem", "ProtectHome", "ReadWritePaths",
                      "PrivateDevices", "PrivateMounts", "MountFlags"):  # fmt: skip
        assert forbidden not in settings


def test_config_example_parses():
    from volfs.daemon import load_config

    example = Path(__file__).parent.parent / "systemd" / "volumes.toml.example"
    declared = load_config(example)
    assert declared["photos"]["size"] == 10 << 30
    assert declared["reference-data"]["read_only"] is True
