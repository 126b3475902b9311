"""Fixtures that mount real volfs volumes through the kernel and always clean up after them.

Every mount is made with the real CLI (``python -m volfs mount``) in a temporary store root,
and every mount and worker process a test started is removed at teardown, also when the test
failed: ``fusermount3 -u``, then SIGKILL of the worker by pid and ``fusermount3 -uz``.

After a test that passed, the fixtures that own a store (``store_root``, under ``volume`` and
``mnt``, and ``host``) run the checks of tests/audit.py: the store fsck-clean, no unexpected
error in its logs, no descriptors leaked by a worker (checked before its unmount). What they
find fails the test at teardown. Shared helpers are in tests/helpers.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from volfs import mounts
from volfs.config import PLUGIN_ENV, PLUGIN_OFF
from volfs.docker_plugin import PLUGIN_DIR, socket_path

import audit
import plugin_client
from docker_engine import DockerEngine, EngineError
from helpers import alive, pid_in, processes, run_dir_of, stop_daemon, volfsd, wait_gone, wait_until
from hosts import Host

#: Whether the test itself (its call phase) passed: the checks after it run only then, since a
#: failed test's store and logs hold its failure already.
CALL_PASSED = pytest.StashKey[bool]()
#: Log patterns the fixtures declare for what they provoke (a worker killed on purpose).
EXPECTED_LOG = pytest.StashKey[list[str]]()


# A daemon a test starts serves no Docker plugin unless the test asks for one (`plugin`): as
# root it would otherwise take /run/docker/plugins/volfs.sock, the host's own driver name, and
# every further test daemon would be refused it.
os.environ[PLUGIN_ENV] = PLUGIN_OFF
#: The short base directory of this run's tmp_paths (`pytest_configure`).
_SHORT_BASE = pytest.StashKey[Path]()
_EXIT_STATUS = pytest.StashKey[int]()
#: Driver names of the session's plugins: one per test, so none sees another's volumes.
_PLUGIN_NAMES = itertools.count()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    for marker in audit.MARKERS:
        config.addinivalue_line("markers", marker)
    # Unix socket paths hold at most 107 bytes, and a test's daemon and workers put theirs
    # under its tmp_path.  pytest's own base (/tmp/pytest-of-root/pytest-N/, and under
    # xdist popen-gwN/ below it) leaves some tests too little room: so a short base of the
    # run's own (the xdist workers get theirs below it), removed at the end of a run that
    # passed and kept for a look after one that failed.
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        config.option.basetemp = tempfile.mkdtemp(prefix="vt", dir="/tmp")
        config.stash[_SHORT_BASE] = Path(config.option.basetemp)


def pytest_unconfigure(config: pytest.Config) -> None:
    base = config.stash.get(_SHORT_BASE, None)
    if base is not None and config.stash.get(_EXIT_STATUS, 1) == 0:
        shutil.rmtree(base, ignore_errors=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT_STATUS] = exitstatus


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[CALL_PASSED] = report.passed


def _passed(node: pytest.Item) -> bool:
    return node.stash.get(CALL_PASSED, False)


class Volume:
    """A volume in a private store root, mounted (and remounted) at paths under tmp_path."""

    def __init__(self, root: Path, name: str, tmp: Path, expected_log: list[str] | None = None):
        self.root = root
        self.name = name
        self._tmp = tmp
        self._mounts = 0
        self.path: Path | None = None
        self.pid: int | None = None
        self._pids: set[int] = set()
        self._paths: list[Path] = []
        self._fds: audit.FdWatch | None = None
        #: Log patterns of what this object provoked (`kill`), for the checks after the test.
        self.expected_log = [] if expected_log is None else expected_log

    def _served_by(self, pid: int) -> None:
        self.pid = pid
        self._pids.add(pid)
        self._fds = audit.FdWatch(pid)

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
        pid = pid_in(self.store / "lock")
        assert pid is not None, "no worker pid in the volume's lock after the mount"
        self._served_by(pid)
        return path

    def check_fds(self) -> None:
        """Fail if the serving worker holds more descriptors than after its mount (a leak).

        `unmount` calls it, and the fixture before its teardown: call it yourself only once
        the files the test opened are closed.
        """
        if self._fds is not None:
            self._fds.check()

    def unmount(self) -> None:
        assert self.path is not None and self.pid is not None
        self.check_fds()
        volfsd("umount", str(self.path), root=self.root)
        assert wait_gone(self.pid, 30), "worker still running after umount"
        self.path = self.pid = None
        self._fds = None

    def remount(self) -> Path:
        """Unmount and mount again at a new path: nothing may survive but the store."""
        self.unmount()
        return self.mount()

    def kill(self) -> None:
        """SIGKILL the serving process (a crash); the daemon mounts the volume again."""
        assert self.pid is not None and self.path is not None
        old, path = self.pid, self.path
        self.expected_log.append(rf"volume {self.name}: its worker exited \(pid {old}, ")
        os.kill(old, signal.SIGKILL)
        assert wait_gone(old, 30)

        def new_worker() -> int | None:
            pid = pid_in(self.store / "lock")
            entry = mounts.find_mount(path)
            if pid is None or pid == old or not alive(pid) or not entry:
                return None
            if entry.fstype != mounts.FSTYPE:
                return None
            # statvfs, not stat: the kernel answers stat from its cache even on the dead
            # mount that stays at the path until the new one replaces it.
            os.statvfs(path)
            return pid

        pid = wait_until(new_worker, "the daemon to bring the volume back after its worker died",
                         timeout=60, ignore=(OSError,))  # fmt: skip
        self._served_by(pid)

    def crash(self) -> Path:
        """SIGKILL the daemon and the worker: the store is left as a crash leaves it, unmounted.

        Return the path it was mounted at: the daemon remembers it and mounts the volume there
        again when it next starts, so mount it again there (any other path would be a second
        mount point of the volume).
        """
        assert self.pid is not None and self.path is not None
        path = self.path
        daemon = pid_in(run_dir_of(self.root) / "volfsd.pid")
        assert daemon is not None, "no daemon pid file"
        for pid in (daemon, self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in (daemon, self.pid):
            assert wait_gone(pid, 30)
        for entry in mounts.volfs_mounts():
            if entry.mountpoint.startswith(str(self._tmp)):
                mounts.detach(entry.mountpoint, lazy=True)
        self.path = self.pid = None
        self._fds = None
        return path

    def cleanup(self, passed: bool = False) -> None:
        """Stop the test's daemon (it unmounts everything), then remove whatever is left.

        If the test *passed*, first check that the worker leaked no descriptors.
        """
        try:
            if passed and self.pid is not None and alive(self.pid):
                self.check_fds()
        finally:
            self._stop()

    def _stop(self) -> None:
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
            if not wait_gone(pid, 10):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                wait_gone(pid, 10)
        staging = run_dir_of(self.root) / "staging"
        for entry in mounts.volfs_mounts():
            if entry.mountpoint.startswith(str(staging)):
                mounts.detach(entry.mountpoint, lazy=True)


#: How many stores the checks after the tests examined, and the seconds they took.
_CHECKED = {"stores": 0, "seconds": 0.0}


def _check_after(root: Path, node: pytest.Item) -> None:
    """The checks after a passed test (tests/audit.py), on store *root*, served no more."""
    if _passed(node):
        started = time.monotonic()
        try:
            audit.check_store(root, node, node.stash.get(EXPECTED_LOG, []))
        finally:
            _CHECKED["stores"] += 1
            _CHECKED["seconds"] += time.monotonic() - started


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _CHECKED["stores"]:
        terminalreporter.write_line(
            f"checks after the tests: {_CHECKED['stores']} stores fsck'd and their logs read "
            f"in {_CHECKED['seconds']:.1f} s"
        )


@pytest.fixture
def host(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Host]:
    """A store root and runtime dir of the test's own, and the CLI pointed at them; the
    daemon and workers they get are stopped after the test, and the store checked."""
    yield from host_at(tmp_path, request.node)


def host_at(path: Path, node: pytest.Item) -> Iterator[Host]:
    """The `host` fixture's body for a host in *path*: a test with several hosts makes the
    others with it."""
    h = Host(path)
    try:
        yield h
    finally:
        h.cleanup(_passed(node))
    _check_after(h.root, node)


@pytest.fixture
def store_root(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A private store root; the daemon a test's CLI call may start there is stopped after,
    and the store checked."""
    root = tmp_path / "store"
    request.node.stash[EXPECTED_LOG] = []
    yield root
    stop_daemon(run_dir_of(root))
    _check_after(root, request.node)


@pytest.fixture
def volume(tmp_path: Path, store_root: Path, request: pytest.FixtureRequest) -> Iterator[Volume]:
    """A fresh volume, not yet mounted; everything it mounts is gone after the test."""
    vol = Volume(store_root, "testvol", tmp_path, request.node.stash[EXPECTED_LOG])
    try:
        yield vol
    finally:
        vol.cleanup(_passed(request.node))


@pytest.fixture
def mnt(volume: Volume) -> Path:
    """The mount point of a fresh, mounted volume."""
    return volume.mount()


@pytest.fixture
def copy(tmp_path: Path, volume: Volume, request: pytest.FixtureRequest) -> Iterator[Volume]:
    """Volume "copy" in the store of ``volume``, which the test makes (an import, a clone);
    everything it mounts is gone after the test."""
    vol = Volume(volume.root, "copy", tmp_path / "copy", request.node.stash[EXPECTED_LOG])
    (tmp_path / "copy").mkdir()
    try:
        yield vol
    finally:
        vol.cleanup(_passed(request.node))


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


class Plugin:
    """A daemon serving a Docker volume plugin under driver name *name* (one of its own if
    None)."""

    def __init__(self, host: Host, name: str | None = None) -> None:
        self.host = host
        self.name = name or f"volfs-t{os.getpid()}-{next(_PLUGIN_NAMES)}"
        self.socket = socket_path(self.name)

    def call(self, endpoint: str, body: object = None) -> tuple[int, dict]:
        return plugin_client.call(self.socket, endpoint, body)


#: The driver name of the tests that use the Docker engine: one for the session.  dockerd
#: keeps every volume driver it has met and asks each of them in `docker volume ls`, retrying
#: one whose socket is gone for up to 30 s: a name per test would make each ls slower.
DOCKER_DRIVER = f"volfs-t{os.getpid()}-docker"


@pytest.fixture
def plugin(host: Host) -> Plugin:
    """A daemon (``host``'s) serving the Docker plugin at a driver name of the test's own."""
    served = Plugin(host)
    host.serve("--docker-plugin", served.name)
    return served


@pytest.fixture
def docker_plugin(host: Host, engine: DockerEngine) -> Iterator[Plugin]:
    """A daemon (``host``'s) serving the session's Docker engine as driver `DOCKER_DRIVER`.
    After the test the engine's containers are removed, and so are the volumes it knows of
    this driver, while the plugin still answers (the next test's daemon has a store of its
    own, and Docker would keep records of volumes it does not have)."""
    served = Plugin(host, DOCKER_DRIVER)
    host.serve("--docker-plugin", served.name)
    try:
        yield served
    finally:
        engine.remove_containers()
        names = engine.docker("volume", "ls", "-q", "--filter", f"driver={served.name}",
                              check=False).stdout.split()  # fmt: skip
        if names:
            engine.docker("volume", "rm", "-f", *names, check=False)


#: The fixtures of tests that start containers (each in a new mount namespace).
_CONTAINER_FIXTURES = frozenset({"engine", "docker_engine", "docker_plugin"})


@pytest.fixture(autouse=True)
def _namespace_makers_run_alone(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[None]:
    """Under pytest-xdist, a test that makes mount namespaces (containers, ``unshare -m``)
    runs while no other test does.  A new mount namespace starts as a copy of the host's,
    with every mount of that moment, and volfs rightly counts a copy of a volume's mount
    as a user of it: another process's test would find its volume busy.  Such a test holds
    an exclusive lock that every other test holds shared."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    alone = request.node.get_closest_marker("mount_namespaces") is not None or bool(
        _CONTAINER_FIXTURES & set(request.fixturenames)
    )
    lock = tmp_path_factory.getbasetemp().parent / "mount-namespaces.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # and the lock with it


@pytest.fixture(autouse=True, scope="session")
def _nothing_left_behind(tmp_path_factory):
    yield
    base = str(tmp_path_factory.getbasetemp())
    left = [m.mountpoint for m in mounts.volfs_mounts() if m.mountpoint.startswith(base)]
    for path in left:
        mounts.detach(path, lazy=True)
    daemons = processes(b"volfs\0serve", b"VOLFS_RUN_DIR=" + base.encode())
    workers = processes(b"--run-dir\0" + base.encode())
    for pid in daemons + workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    sockets = sorted(str(p) for p in PLUGIN_DIR.glob(f"volfs-t{os.getpid()}-*.sock"))
    for path in sockets:
        os.unlink(path)
    assert not left, f"tests left mounts behind: {left}"
    assert not sockets, f"tests left Docker plugin sockets behind: {sockets}"
    assert not daemons, f"tests left volfsd daemons behind: {daemons}"
    assert not workers, f"tests left mount workers behind: {workers}"
