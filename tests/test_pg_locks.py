"""Locks across hosts on a PostgreSQL volume, and host leases: the rules as pure functions
(`volfs.pg.locks`), then fcntl and flock locks through two real mounts of one volume
(tests/pg.py), a killed and a stopped host, and SQLite from both hosts on one file."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import trio

from volfs import pyfuse3_build, requests, workerctl
from volfs.pg.locks import TO_END, Lock, conflict, flock_change, posix_change, span, stored_owner
from volfs.pg.schema import create_volume

from helpers import wait_until

pytest_plugins = ["pg"]  # its fixtures: pg_server, pg_url, pg_hosts

#: Generous bounds for what normally takes milliseconds (a loaded machine).
WAIT = 30
#: A short lease for the tests of a stopped host (it is renewed every third of it).
SHORT_LEASE = "3"

# -- the rules --------------------------------------------------------------------------------


def _lock(start: int, stop: int, exclusive: bool = True, owner: int = 1, session: str = "a"):
    return Lock(session, owner, exclusive, start, stop, 100)


def test_a_write_lock_conflicts_with_any_lock_of_another_owner_on_its_bytes():
    held = [_lock(0, 10, exclusive=False, owner=2)]
    assert conflict(held, _lock(5, 6)) == held[0]
    assert conflict(held, _lock(10, 20)) is None  # [0, 10) ends before byte 10
    assert conflict(held, _lock(5, 6, exclusive=False)) is None  # readers share
    assert conflict([_lock(0, 10, owner=2)], _lock(9, 10, exclusive=False)) is not None
    assert conflict([_lock(0, 10)], _lock(0, 10)) is None  # the owner's own lock
    assert conflict([_lock(0, 10, session="b")], _lock(0, 10)) is not None  # another host's


def test_a_range_of_length_zero_runs_to_the_end_of_the_file():
    assert span(5, 0) == (5, TO_END)
    assert span(5, 10) == (5, 15)
    assert conflict([_lock(*span(1 << 40, 0), owner=2)], _lock(*span(1 << 50, 1))) is not None


def test_an_unlock_of_a_sub_range_splits_the_lock_and_relocking_merges_it():
    whole = [_lock(0, 100)]
    split = posix_change(whole, _lock(40, 60), unlock=True)
    assert [(x.start, x.stop) for x in split] == [(0, 40), (60, 100)]
    read_middle = posix_change(split, _lock(40, 60, exclusive=False))
    assert [(x.start, x.stop, x.exclusive) for x in read_middle] == [
        (0, 40, True), (40, 60, False), (60, 100, True)]  # fmt: skip
    # A write lock over the middle again: one lock of the three (touching ones merge).
    assert [(x.start, x.stop) for x in posix_change(read_middle, _lock(40, 60))] == [(0, 100)]
    # A read lock over part of a write lock replaces that part, the rest stays.
    changed = posix_change(whole, _lock(90, 200, exclusive=False))
    assert [(x.start, x.stop, x.exclusive) for x in changed] == [(0, 90, True),
                                                                (90, 200, False)]  # fmt: skip
    assert posix_change(whole, _lock(0, TO_END), unlock=True) == []


def test_a_flock_lock_is_one_per_owner_and_covers_the_file():
    shared = flock_change([], _lock(0, 0, exclusive=False))
    assert [(x.start, x.stop, x.exclusive) for x in shared] == [(0, TO_END, False)]
    assert flock_change(shared, _lock(0, 0)) == [_lock(0, TO_END)]  # a conversion
    assert flock_change(shared, _lock(0, 0), unlock=True) == []


def test_the_kernels_unsigned_owners_fit_the_signed_column():
    assert stored_owner(5) == 5
    assert stored_owner((1 << 64) - 1) == -1
    assert stored_owner(1 << 63) == -(1 << 63)


# -- through two hosts ------------------------------------------------------------------------

#: A process that holds locks through one host, doing what each line on its stdin says.
_HOLDER = r"""
import errno, fcntl, os, signal, sys
def interrupted(*_):
    raise InterruptedError(errno.EINTR, "interrupted")
signal.signal(signal.SIGUSR1, interrupted)
f = open(sys.argv[1], "r+b", buffering=0)
for line in sys.stdin:
    op, *args = line.split()
    try:
        if op == "lockf":
            fcntl.lockf(f, *map(int, args))
        elif op == "flock":
            fcntl.flock(f, int(args[0]))
        elif op == "write":
            os.pwrite(f.fileno(), args[0].encode(), 0)
        print("ok", flush=True)
    except OSError as exc:
        print("errno", exc.errno, flush=True)
"""


class Holder:
    """A process with *path* open that takes and drops locks on request."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)  # fmt: skip

    def do(self, *words: object) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(" ".join(map(str, words)) + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        """Let it close its file and end (its locks go with the descriptor)."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=WAIT)


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    started: list[Holder] = []
    try:
        yield started
    finally:
        for holder in started:
            if holder.proc.poll() is None:
                holder.proc.kill()
                holder.proc.wait()


def _hold(holders: list[Holder], path: Path) -> Holder:
    holder = Holder(path)
    holders.append(holder)
    return holder


def _getlk(fd: int, kind: int, start: int, length: int) -> tuple[int, int, int, int]:
    """F_GETLK: (type, start, length, pid) of a conflicting lock, or type F_UNLCK."""
    layout = "hhqqi4x"  # struct flock on Linux (native alignment)
    asked = struct.pack(layout, kind, os.SEEK_SET, start, length, 0)
    got = struct.unpack(layout, fcntl.fcntl(fd, fcntl.F_GETLK, asked))
    return got[0], got[2], got[3], got[4]


def _refused(call, *args) -> int:
    with pytest.raises(OSError) as info:
        call(*args)
    return info.value.errno


def test_a_write_lock_on_one_host_refuses_the_other_until_closed(pg_url, pg_hosts, holders):
    create_volume(pg_url, "v")
    a, b = pg_hosts(), pg_hosts()
    (a.mountpoint / "f").write_bytes(b"x" * 100)
    holder = _hold(holders, a.mountpoint / "f")
    assert holder.do("lockf", fcntl.LOCK_EX | fcntl.LOCK_NB, 0, 0) == "ok"
    with open(b.mountpoint / "f", "r+b") as f:
        assert _refused(fcntl.lockf, f, fcntl.LOCK_EX | fcntl.LOCK_NB) == errno.EAGAIN
        assert _refused(fcntl.lockf, f, fcntl.LOCK_SH | fcntl.LOCK_NB, 10, 50) == errno.EAGAIN
        assert _getlk(f.fileno(), fcntl.F_RDLCK, 10, 5) == (fcntl.F_WRLCK, 0, 0, holder.proc.pid)
        # flock locks are another kind: a POSIX lock does not stop them (as on Linux).
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(f, fcntl.LOCK_UN)
        holder.close()  # closing the descriptor (the holder's exit) releases its locks
        assert _getlk(f.fileno(), fcntl.F_WRLCK, 0, 0)[0] == fcntl.F_UNLCK
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with psycopg.connect(pg_url) as conn:  # b's close released it in the database too
        assert conn.execute("SELECT count(*) FROM locks").fetchone()[0] == 0


def test_byte_ranges_split_and_unlock_across_hosts(pg_url, pg_hosts, holders):
    create_volume(pg_url, "v")
    a, b = pg_hosts(), pg_hosts()
    (a.mountpoint / "f").write_bytes(b"x" * 200)
    holder = _hold(holders, a.mountpoint / "f")
    assert holder.do("lockf", fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 0) == "ok"  # [0, 100)
    assert holder.do("lockf", fcntl.LOCK_UN, 20, 40) == "ok"  # [40, 60) unlocked
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT start, stop FROM locks ORDER BY start").fetchall()
    assert rows == [(0, 40), (60, 100)]
    with open(b.mountpoint / "f", "r+b") as f:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 20, 40)  # the hole between them
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 100)  # past them
        for length, start in ((10, 0), (1, 39), (1, 60), (40, 60)):
            assert _refused(fcntl.lockf, f, fcntl.LOCK_SH | fcntl.LOCK_NB, length,
                            start) == errno.EAGAIN  # fmt: skip
        assert _getlk(f.fileno(), fcntl.F_WRLCK, 55, 20) == (fcntl.F_WRLCK, 60, 40,
                                                             holder.proc.pid)  # fmt: skip


def _worker_stats(run_dir: Path) -> dict:
    return trio.run(workerctl.call, workerctl.socket_path(run_dir, "v"),
                    requests.WorkerStatsRequest())  # fmt: skip


def test_an_engine_volume_asks_the_kernel_for_its_locks(pg_url, pg_hosts, tmp_path):
    create_volume(pg_url, "v")
    host = pg_hosts(options=["--run-dir", str(tmp_path)])
    os.stat(host.mountpoint)  # answered only after the kernel's INIT
    status = trio.run(workerctl.call, workerctl.socket_path(tmp_path, "v"),
                      requests.WorkerStatusRequest())  # fmt: skip
    locks = pyfuse3_build.capability("POSIX_LOCKS") | pyfuse3_build.capability("FLOCK_LOCKS")
    assert status["fuse_capabilities"]["granted"] & locks == locks  # a local one does not


def test_a_blocking_flock_is_woken_when_the_other_host_unlocks(pg_url, pg_hosts, holders,
                                                               tmp_path):  # fmt: skip
    create_volume(pg_url, "v")
    a, b = pg_hosts(), pg_hosts(options=["--run-dir", str(tmp_path)])
    (a.mountpoint / "f").write_bytes(b"")
    holder = _hold(holders, a.mountpoint / "f")
    assert holder.do("flock", fcntl.LOCK_EX) == "ok"
    taken: list[float] = []
    with open(b.mountpoint / "f", "rb") as f:
        assert _refused(fcntl.flock, f, fcntl.LOCK_EX | fcntl.LOCK_NB) == errno.EWOULDBLOCK
        assert _refused(fcntl.flock, f, fcntl.LOCK_SH | fcntl.LOCK_NB) == errno.EWOULDBLOCK

        def wait_for_it() -> None:
            with open(b.mountpoint / "f", "rb") as g:
                fcntl.flock(g, fcntl.LOCK_EX)  # waits
                taken.append(time.monotonic())

        waiter = threading.Thread(target=wait_for_it)
        waiter.start()
        try:
            wait_until(lambda: _worker_stats(tmp_path)["lock_waits"] == 1, "b's flock to wait")
            assert not taken
            unlocked = time.monotonic()
            assert holder.do("flock", fcntl.LOCK_UN) == "ok"
        finally:
            waiter.join(WAIT)
    assert taken, "the waiting flock never got the lock"
    stats = _worker_stats(tmp_path)
    assert stats["lock_wakeups"] >= 1, stats  # woken by the release, not only by a recheck
    print(f"a blocked flock on b got the lock {(taken[0] - unlocked) * 1000:.1f} ms after the "
          "unlock on a")  # fmt: skip


def test_an_interrupted_wait_is_eintr_and_leaves_nothing(pg_url, pg_hosts, holders, tmp_path):
    create_volume(pg_url, "v")
    a, b = pg_hosts(), pg_hosts(options=["--run-dir", str(tmp_path)])
    (a.mountpoint / "f").write_bytes(b"")
    holder = _hold(holders, a.mountpoint / "f")
    assert holder.do("lockf", fcntl.LOCK_EX, 0, 0) == "ok"
    waiter = _hold(holders, b.mountpoint / "f")
    assert waiter.proc.stdin is not None and waiter.proc.stdout is not None
    waiter.proc.stdin.write(f"lockf {fcntl.LOCK_EX} 0 0\n")  # F_SETLKW: it waits
    waiter.proc.stdin.flush()
    wait_until(lambda: _worker_stats(tmp_path)["lock_waits"] == 1, "the waiter to wait")
    # Unless the worker answers the kernel's INTERRUPT, the call goes on waiting.
    os.kill(waiter.proc.pid, signal.SIGUSR1)
    assert waiter.proc.stdout.readline().strip() == f"errno {errno.EINTR}"
    assert holder.do("lockf", fcntl.LOCK_UN, 0, 0) == "ok"
    assert waiter.do("lockf", fcntl.LOCK_EX | fcntl.LOCK_NB, 0, 0) == "ok"  # nothing left over
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM locks").fetchone()[0] == 1


def test_a_killed_workers_locks_go_with_its_session(pg_url, pg_hosts, holders):
    create_volume(pg_url, "v")
    a, b = pg_hosts(), pg_hosts()
    (a.mountpoint / "f").write_bytes(b"")
    holder = _hold(holders, a.mountpoint / "f")
    assert holder.do("lockf", fcntl.LOCK_EX | fcntl.LOCK_NB, 0, 0) == "ok"
    os.kill(a.proc.pid, signal.SIGKILL)
    a.proc.wait()
    with open(b.mountpoint / "f", "r+b") as f:
        # Its process is gone (on this host): its session is taken over by the request.
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM sessions").fetchone()[0] == 1
    assert "taking over session" in b.log_text()


@pytest.mark.expect_log("session .* is over", "failed in the store")
def test_a_stopped_host_loses_its_locks_at_expiry_and_cannot_write_after(pg_url, pg_hosts,
                                                                         holders):  # fmt: skip
    create_volume(pg_url, "v")
    a = pg_hosts(options=["--lease", SHORT_LEASE])
    b = pg_hosts(options=["--lease", SHORT_LEASE])
    (a.mountpoint / "f").write_bytes(b"from a")
    holder = _hold(holders, a.mountpoint / "f")
    assert holder.do("lockf", fcntl.LOCK_EX | fcntl.LOCK_NB, 0, 0) == "ok"
    os.kill(a.proc.pid, signal.SIGSTOP)  # it keeps its connections, and stops renewing
    try:
        with open(b.mountpoint / "f", "r+b", buffering=0) as f:
            assert _refused(fcntl.lockf, f, fcntl.LOCK_EX | fcntl.LOCK_NB) == errno.EAGAIN
            wait_until(lambda: fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB) is None,
                       "a's lease to expire", WAIT, ignore=(BlockingIOError,))  # fmt: skip
            f.write(b"from b")
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    assert holder.do("write", "stale") == f"errno {errno.EIO}"  # not over b's bytes
    assert (b.mountpoint / "f").read_bytes() == b"from b"
    assert "is over" in a.log_text()
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM sessions").fetchone()[0] == 1


_SQLITE_WRITER = r"""
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
db.execute("PRAGMA journal_mode=DELETE")
db.execute("CREATE TABLE IF NOT EXISTS t (host TEXT, n INTEGER, pad TEXT)")
for n in range(int(sys.argv[3])):
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO t VALUES (?, ?, ?)", (sys.argv[2], n, "x" * 3000))
    db.execute("COMMIT")
db.close()
"""


def test_sqlite_from_two_hosts_on_one_file(pg_url, pg_hosts):
    create_volume(pg_url, "v")
    a, b = pg_hosts(), pg_hosts()
    rows = 150
    writers = [subprocess.Popen([sys.executable, "-c", _SQLITE_WRITER,
                                 str(host.mountpoint / "db.sqlite"), name, str(rows)])
               for host, name in ((a, "a"), (b, "b"))]  # fmt: skip
    try:
        for writer in writers:
            assert writer.wait(timeout=300) == 0
    finally:  # none left writing through a mount the fixture takes away
        for writer in writers:
            writer.kill()
            writer.wait()
    for host in (a, b):
        check = subprocess.run(
            [sys.executable, "-c", "import sqlite3, sys; db = sqlite3.connect(sys.argv[1]); "
             "print(db.execute('PRAGMA integrity_check').fetchone()[0], *db.execute("
             "'SELECT host, count(*) FROM t GROUP BY host ORDER BY host').fetchall())",
             str(host.mountpoint / "db.sqlite")],
            capture_output=True, text=True, timeout=WAIT,
        )  # fmt: skip
        assert check.stdout.split(" ", 1) == ["ok", f"('a', {rows}) ('b', {rows})\n"], check
