"""A real PostgreSQL server for the tests, and a database of its own for each test.

`pg_server` (session scope) runs Debian's PostgreSQL 15 from its binaries: ``initdb -A trust
--no-sync`` into a private directory and ``pg_ctl -w start`` listening only on a Unix socket
in a private directory, as the ``postgres`` user (the server refuses to run as root).  It is
tuned for tests, not for durability: ``fsync=off`` and ``full_page_writes=off`` (a crash of
the machine may lose the test's data, which nobody keeps).  It is stopped by the postmaster's
pid at the end of the session, also when a test failed.

`pg_url` (function scope) creates a database for one test and drops it at the end (the
connections a test left open are ended with it).

`EngineWorker` is one mount worker serving a volume of the engine (`volfs.worker
--engine-url-fd`, and the worker options a test gives, such as ``--lease``): a "host" of the
volume.  `pg_hosts` gives a test a factory of them and
stops every one it started, by pid, and detaches its mount, also when the test failed; a test
that passed must leave no ERROR line in any worker's log but those it declares, and every
volume of the database clean (`volfs.pg.check`; the ``store_damaged`` marker exempts one).

Without the PostgreSQL binaries the tests that need them are skipped, saying so, except in CI
(``CI=true``), where that is a failure: CI installs them (.ci/run, install.sh).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import psycopg
import pytest

from volfs import mounts
from volfs.pg import check

import audit
from helpers import alive, end, wait_gone

PG_USER = "postgres"
PORT = 5432  # the socket's name only: it lives in the server's private directory


def bin_dir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


class PostgresServer:
    """One PostgreSQL server in *base*, run as `PG_USER`."""

    def __init__(self, bin_dir: Path, base: Path) -> None:
        self.bin_dir = bin_dir
        self.base = base
        self.data = base / "data"
        self.socket_dir = base / "socket"
        self.log = base / "server.log"
        self.pid: int | None = None

    def _as_postgres(self, *argv: str) -> None:
        done = subprocess.run(["runuser", "-u", PG_USER, "--", *argv], capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {done.stderr or done.stdout}")

    def start(self) -> None:
        user = pwd.getpwnam(PG_USER)
        for path in (self.base, self.socket_dir):
            path.mkdir(exist_ok=True)
            os.chown(path, user.pw_uid, user.pw_gid)
        self.base.chmod(0o755)
        self._as_postgres(str(self.bin_dir / "initdb"), "-D", str(self.data), "-A", "trust",
                          "-U", "postgres", "--no-sync", "-E", "UTF8")  # fmt: skip
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("fsync = off\nfull_page_writes = off\nshared_buffers = 64MB\n"
                       "max_connections = 200\nlisten_addresses = ''\n")  # fmt: skip
        self.run()

    def run(self) -> None:
        """Start the postmaster on the data directory (again, after `halt`)."""
        self._as_postgres(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l",
                          str(self.log), "-w", "-t", "60", "-o",
                          f"-p {PORT} -c unix_socket_directories={self.socket_dir}",
                          "start")  # fmt: skip
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}&port={PORT}"

    def halt(self, how: int = signal.SIGINT) -> None:
        """Stop the postmaster by its pid: SIGINT a fast shutdown, SIGQUIT an immediate one
        (a crash, recovered at the next start); SIGKILL if it is still there after 30 s."""
        if self.pid is not None and alive(self.pid):
            os.kill(self.pid, how)
            if not wait_gone(self.pid, 30):
                os.kill(self.pid, signal.SIGKILL)
                wait_gone(self.pid, 10)

    def stop(self) -> None:
        """`halt` and remove its files."""
        self.halt()
        shutil.rmtree(self.base, ignore_errors=True)

    def execute(self, sql: str, database: str = "postgres") -> None:
        with psycopg.connect(self.url(database), autocommit=True) as conn:
            conn.execute(sql)  # type: ignore[arg-type]


def _server(prefix: str) -> Iterator[PostgresServer]:
    """A started server in a new directory named *prefix*..., stopped and removed after;
    without PostgreSQL's binaries a skip, but in CI (``CI=true``) a failure."""
    found = bin_dir()
    if found is None or shutil.which("runuser") is None:
        why = "PostgreSQL's binaries (Debian's postgresql) are not installed"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why}: .ci/run must install them", pytrace=False)
        pytest.skip(why)
    server = PostgresServer(found, Path(tempfile.mkdtemp(prefix=prefix)))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server (see the module's docstring)."""
    yield from _server("volfs-pg-")


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> Iterator[str]:
    """The URL of a new database for this test, dropped at its end."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    pg_server.execute(f"CREATE DATABASE {name}")
    try:
        yield pg_server.url(name)
    finally:
        with contextlib.suppress(psycopg.Error):
            pg_server.execute(f"DROP DATABASE {name} WITH (FORCE)")


class EngineWorker:
    """A mount worker serving volume *name* of the engine at *url* at *mountpoint*."""

    def __init__(self, url: str, name: str, base: Path, options: Sequence[str] = ()) -> None:
        self.base = base
        self.mountpoint = base / "mnt"
        self.mountpoint.mkdir(parents=True)
        (base / "store").mkdir()
        (base / "logs").mkdir()
        self.log = base / "logs" / "worker.log"  # where `audit.log_faults` reads
        self.run_dir = base / "run"  #: where it answers on its control socket
        self.run_dir.mkdir()
        url_r, url_w = os.pipe()
        ready_r, ready_w = os.pipe()
        os.write(url_w, url.encode())
        os.close(url_w)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "volfs.worker", "--root", str(base / "store"), "--name",
                 name, "--mountpoint", str(self.mountpoint), "--ready-fd", str(ready_w),
                 "--engine-url-fd", str(url_r), "--run-dir", str(self.run_dir), *options],
                pass_fds=(url_r, ready_w), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )  # fmt: skip
        os.close(url_r)
        os.close(ready_w)
        with os.fdopen(ready_r, "rb") as ready:
            line = ready.readline().decode()
        if not line.startswith("ok"):
            self.stop()
            raise AssertionError(f"the worker did not mount ({line!r}):\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        """End the worker by its pid (SIGTERM: it unmounts), and detach a mount it left."""
        end(self.proc.pid, grace=30)
        self.proc.wait()
        if mounts.find_mount(self.mountpoint) is not None:
            mounts.detach(str(self.mountpoint), lazy=True)


@pytest.fixture
def pg_hosts(pg_url: str, request: pytest.FixtureRequest) -> Iterator[Callable[..., EngineWorker]]:
    """A factory of workers serving volumes of this test's database (`EngineWorker`): each
    one a host.  The test's ``expect_log`` marker names the errors it provokes."""
    yield from _hosts(pg_url, request)


@pytest.fixture
def pg_own() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test's own, to stop and start (`halt`, `run`); removed at
    the end of the test.  `pg_own_hosts` serves its volumes."""
    yield from _server("volfs-pg-own-")


@pytest.fixture
def pg_own_hosts(
    pg_own: PostgresServer, request: pytest.FixtureRequest
) -> Iterator[Callable[..., EngineWorker]]:
    """`pg_hosts` for the volumes of `pg_own`."""
    yield from _hosts(pg_own.url(), request)


def _hosts(url: str, request: pytest.FixtureRequest) -> Iterator[Callable[..., EngineWorker]]:
    started: list[EngineWorker] = []
    base = Path(tempfile.mkdtemp(prefix="volfs-pghosts-"))

    def start(name: str = "v", options: Sequence[str] = ()) -> EngineWorker:
        worker = EngineWorker(url, name, base / f"host{len(started)}", options)
        started.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in started:
            worker.stop()
        shutil.rmtree(base, ignore_errors=True)
    expected = audit.expected_log(request.node)
    faults = [f for worker in started for f in audit.log_faults(worker.base, expected)]
    assert not faults, "the workers logged errors:\n" + "\n".join(faults)
    if not request.node.get_closest_marker("store_damaged"):
        assert_clean(url)


def assert_clean(url: str) -> None:
    """Fail if a volume of the database at *url* has a problem (`volfs.pg.check`); unlinked
    inodes a kernel kept looked up until its unmount are none."""
    with psycopg.connect(url) as conn:
        found = [f"volume {vid}: {p}" for (vid,) in conn.execute("SELECT id FROM volumes")
                 for p in check.problems(conn, vid, unlinked_ok=True)]  # fmt: skip
    assert not found, "the engine's volumes are not clean:\n" + "\n".join(found)
