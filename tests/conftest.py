"""Fixtures that mount real volfs volumes through the kernel and always clean up after them.

Every mount is made with the real CLI (``python -m volfs mount``) in a temporary store root,
and every mount and worker process a test started is removed at teardown, also when the test
failed: ``fusermount3 -u``, then SIGKILL of the worker by pid and ``fusermount3 -uz``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from volfs import mounts

from docker_engine import DockerEngine, EngineError

VOLFSD = [sys.executable, "-m", "volfs"]


def run_dir_of(root: Path) -> Path:
    """The daemon runtime dir that goes with a test's store root: private to the test."""
    return root.parent / "run"


def volfsd(*args: str, root: Path, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run the CLI with *root* as the store root (and its own daemon); return the result."""
    env = {**os.environ, "VOLFS_ROOT": str(root), "VOLFS_RUN_DIR": str(run_dir_of(root))}
    done = subprocess.run(
        [*VOLFSD, *args], env=env, capture_output=True, text=True, timeout=120, **kwargs
    )
    if check and done.returncode != 0:
        raise AssertionError(f"volfsd {' '.join(args)} failed: {done.stderr.strip()}")
    return done


def as_nobody(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run *argv* as uid and gid 65534 with no supplementary groups; output captured as text."""
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not alive for our purposes.
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as st:
        return st.read().split(") ", 1)[1][0] != "Z"
    return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.02)
    return not _alive(pid)


class Volume:
    """A volume in a private store root, mounted (and remounted) at paths under tmp_path."""

    def __init__(self, root: Path, name: str, tmp: Path) -> None:
        self.root = root
        self.name = name
        self._tmp = tmp
        self._mounts = 0
        self.path: Path | None = None
        self.pid: int | None = None
        self._pids: set[int] = set()
        self._paths: list[Path] = []

    @property
    def store(self) -> Path:
        return self.root / "volumes" / self.name

    @property
    def log_file(self) -> Path:
        return self.root / "logs" / f"{self.name}.log"

    def mount(self, path: Path | None = None, *extra: str) -> Path:
        if path is None:
            self._mounts += 1
            path = self._tmp / f"mnt{self._mounts}"
        self._paths.append(path)
        volfsd("mount", self.name, str(path), *extra, root=self.root)
        self.path = path
        self.pid = int((self.store / "lock").read_text().split()[0])
        self._pids.add(self.pid)
        return path

    def unmount(self) -> None:
        assert self.path is not None
        volfsd("umount", str(self.path), root=self.root)
        assert _wait_gone(self.pid, 30), "worker still running after umount"
        self.path = self.pid = None

    def remount(self) -> Path:
        """Unmount and mount again at a new path: nothing may survive but the store."""
        self.unmount()
        return self.mount()

    def kill(self) -> None:
        """SIGKILL the serving process (a crash); the daemon mounts the volume again."""
        assert self.pid is not None and self.path is not None
        old = self.pid
        os.kill(old, signal.SIGKILL)
        assert _wait_gone(old, 30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError, IndexError):
                pid = int((self.store / "lock").read_text().split()[0])
                entry = mounts.find_mount(self.path)
                if pid != old and _alive(pid) and entry and entry.fstype == mounts.FSTYPE:
                    # statvfs, not stat: the kernel answers stat from its cache even on the
                    # dead mount that stays at the path until the new one replaces it.
                    os.statvfs(self.path)
                    self.pid = pid
                    self._pids.add(pid)
                    return
            time.sleep(0.05)
        raise AssertionError("the daemon did not bring the volume back after its worker died")

    def crash(self) -> Path:
        """SIGKILL the daemon and the worker: the store is left as a crash leaves it, unmounted.

        Return the path it was mounted at: the daemon remembers it and mounts the volume there
        again when it next starts, so mount it again there (any other path would be a second
        mount point of the volume).
        """
        assert self.pid is not None and self.path is not None
        path = self.path
        daemon = int((run_dir_of(self.root) / "volfsd.pid").read_text().split()[0])
        for pid in (daemon, self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in (daemon, self.pid):
            assert _wait_gone(pid, 30)
        for entry in mounts.volfs_mounts():
            if entry.mountpoint.startswith(str(self._tmp)):
                mounts.detach(entry.mountpoint, lazy=True)
        self.path = self.pid = None
        return path

    def cleanup(self) -> None:
        """Stop the test's daemon (it unmounts everything), then remove whatever is left."""
        daemon = stop_daemon(run_dir_of(self.root))
        if daemon is not None:
            self._pids.add(daemon)
        for path in reversed(self._paths):
            if mounts.find_mount(path) is not None and mounts.detach(path) is not None:
                for pid in self._pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                mounts.detach(path, lazy=True)
        for pid in self._pids:
            if not _wait_gone(pid, 10):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, 10)
        staging = run_dir_of(self.root) / "staging"
        for entry in mounts.volfs_mounts():
            if entry.mountpoint.startswith(str(staging)):
                mounts.detach(entry.mountpoint, lazy=True)


def stop_daemon(run_dir: Path) -> int | None:
    """Stop the daemon of *run_dir* (if any) and every worker it started.

    SIGTERM alone is a hand-off (the workers go on serving), so first `umount --all`, the
    full stop; then SIGTERM, and SIGKILL for a daemon or worker that hangs.
    """
    try:
        pid = int((run_dir / "volfsd.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pid = None
    if pid is not None and _alive(pid):
        env = {
            **os.environ,
            "VOLFS_RUN_DIR": str(run_dir),
            "VOLFS_ROOT": str(run_dir.parent / "store"),
        }
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run([*VOLFSD, "umount", "--all"], env=env, capture_output=True, timeout=150)
        _end(pid, grace=60)
    for worker in workers_of(run_dir):
        _end(worker, grace=30)
    return pid


def _end(pid: int, grace: float) -> None:
    """SIGTERM *pid*, and SIGKILL it if it has not ended after *grace* s."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, grace):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 10)


def stop_foreground(proc: subprocess.Popen, mnt: Path) -> None:
    """End a `volfsd mount -f` process (SIGTERM, then SIGKILL) and detach what it left."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if mounts.find_mount(mnt) is not None:
        mounts.detach(mnt, lazy=True)


def _processes(marker: bytes, env_prefix: bytes | None = None) -> list[int]:
    """Pids whose command line holds *marker* (and, if given, an environment variable
    starting with *env_prefix*)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if marker not in (entry / "cmdline").read_bytes():
                continue
            if env_prefix is not None:
                env = (entry / "environ").read_bytes().split(b"\0")
                if not any(e.startswith(env_prefix) for e in env):
                    continue
            if _alive(int(entry.name)):
                pids.append(int(entry.name))
    return pids


def workers_of(run_dir: Path) -> list[int]:
    """Pids of the mount workers a daemon with runtime dir *run_dir* started."""
    return _processes(b"--run-dir\0" + str(run_dir).encode() + b"\0")


@pytest.fixture
def host(tmp_path: Path):
    """A store root and runtime dir of the test's own, and the CLI pointed at them; the
    daemon and workers they get are stopped after the test."""
    from hosts import Host

    h = Host(tmp_path)
    try:
        yield h
    finally:
        h.cleanup()


@pytest.fixture
def store_root(tmp_path: Path):
    """A private store root; the daemon a test's CLI call may start there is stopped after."""
    root = tmp_path / "store"
    yield root
    stop_daemon(run_dir_of(root))


@pytest.fixture
def volume(tmp_path: Path, store_root: Path):
    """A fresh volume, not yet mounted; everything it mounts is gone after the test."""
    vol = Volume(store_root, "testvol", tmp_path)
    try:
        yield vol
    finally:
        vol.cleanup()


@pytest.fixture
def mnt(volume: Volume) -> Path:
    """The mount point of a fresh, mounted volume."""
    return volume.mount()


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory):
    """A real Docker engine of the session's own, started on first use, stopped at the end.

    It fails (not skips) the tests that need it when dockerd cannot start: CI runs as root on
    machines where it can, so a skip would hide a broken set-up. See tests/docker_engine.py.
    """
    engine = DockerEngine(tmp_path_factory.mktemp("docker"))
    try:
        try:
            engine.start()
        except EngineError as exc:
            pytest.fail(str(exc), pytrace=False)
        yield engine
    finally:
        engine.stop()


@pytest.fixture
def engine(docker_engine: DockerEngine):
    """The session's Docker engine; every container is removed after the test, pass or fail.

    Request it after the volumes its containers bind (``def test_x(mnt, engine)``), so that
    its containers are gone before the volumes are unmounted.
    """
    try:
        yield docker_engine
    finally:
        docker_engine.remove_containers()


def _our_daemons(base: str) -> list[int]:
    """Pids of volfsd daemons whose runtime dir lies under *base*."""
    return _processes(b"volfs\0serve", b"VOLFS_RUN_DIR=" + base.encode())


def _our_workers(base: str) -> list[int]:
    """Pids of mount workers whose runtime dir lies under *base*."""
    return _processes(b"--run-dir\0" + base.encode())


@pytest.fixture(autouse=True, scope="session")
def _nothing_left_behind(tmp_path_factory):
    yield
    base = str(tmp_path_factory.getbasetemp())
    left = [m.mountpoint for m in mounts.volfs_mounts() if m.mountpoint.startswith(base)]
    for path in left:
        mounts.detach(path, lazy=True)
    daemons = _our_daemons(base)
    workers = _our_workers(base)
    for pid in daemons + workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"tests left mounts behind: {left}"
    assert not daemons, f"tests left volfsd daemons behind: {daemons}"
    assert not workers, f"tests left mount workers behind: {workers}"
