"""One PostgreSQL volume served by two workers at once, as two hosts would: what one host
changes the other sees, the namespace stays serializable, the quota is exact across both,
and damaged data is EIO, never wrong bytes.  Real PostgreSQL, real mounts (tests/pg.py)."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
import time

import psycopg
import pytest
import trio

from volfs import requests, workerctl
from volfs.errors import ErrorCode
from volfs.pg.feed import FEED_PURPOSE
from volfs.pg.schema import create_volume

from helpers import wait_until

pytest_plugins = ["pg"]  # its fixtures: pg_server, pg_url, pg_hosts

#: How long a change may take to reach the other mount through the feed (generous: a loaded
#: machine; it normally takes milliseconds).
FEED_WAIT = 10


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_a_change_on_one_host_is_seen_on_the_other(pg_url, pg_hosts):
    create_volume(pg_url, "v")
    a, b = pg_hosts(), pg_hosts()
    (a.mountpoint / "f").write_bytes(b"one")
    assert _read(b.mountpoint / "f") == b"one"  # close-to-open
    assert not (b.mountpoint / "later").exists()  # a negative entry b's kernel caches
    (a.mountpoint / "later").write_bytes(b"new")
    wait_until(lambda: (b.mountpoint / "later").exists(), "the new name on b", FEED_WAIT)
    (a.mountpoint / "f").write_bytes(b"second version")  # attributes and pages b cached
    wait_until(lambda: _read(b.mountpoint / "f") == b"second version", "the rewrite on b",
               FEED_WAIT)  # fmt: skip
    os.rename(a.mountpoint / "f", a.mountpoint / "g")
    wait_until(lambda: not (b.mountpoint / "f").exists(), "the rename on b", FEED_WAIT)
    assert _read(b.mountpoint / "g") == b"second version"
    with open(b.mountpoint / "g", "ab") as f:  # and back the other way
        f.write(b" appended")
    wait_until(lambda: _read(a.mountpoint / "g").endswith(b"appended"), "the append on a",
               FEED_WAIT)  # fmt: skip


def test_an_open_file_unlinked_elsewhere_stays_readable(pg_url, pg_hosts):
    create_volume(pg_url, "v")
    a, b = pg_hosts(), pg_hosts()
    (a.mountpoint / "f").write_bytes(b"kept")
    with open(b.mountpoint / "f", "rb") as held:
        os.unlink(a.mountpoint / "f")
        wait_until(lambda: not (b.mountpoint / "f").exists(), "the unlink on b", FEED_WAIT)
        assert held.read() == b"kept"
    with psycopg.connect(pg_url) as conn:  # b let go: the inode and its data are gone
        wait_until(lambda: conn.execute("SELECT count(*) FROM inodes").fetchone()[0] == 1,
                   "the unlinked inode to be freed", FEED_WAIT)  # fmt: skip


def test_rmdir_against_a_create_inside_leaves_no_orphan(pg_url, pg_hosts):
    create_volume(pg_url, "v")
    a, b = pg_hosts(), pg_hosts()
    for round_ in range(20):
        d = f"d{round_}"
        os.mkdir(a.mountpoint / d)
        wait_until(lambda d=d: (b.mountpoint / d).is_dir(), "the directory on b", FEED_WAIT)
        outcome: dict[str, object] = {}

        def remove(d: str = d, outcome: dict[str, object] = outcome) -> None:
            try:
                os.rmdir(a.mountpoint / d)
                outcome["rmdir"] = True
            except OSError as exc:
                outcome["rmdir"] = exc.errno

        def create(d: str = d, outcome: dict[str, object] = outcome) -> None:
            try:
                (b.mountpoint / d / "inside").write_bytes(b"x")
                outcome["create"] = True
            except OSError as exc:
                outcome["create"] = exc.errno

        threads = [threading.Thread(target=remove), threading.Thread(target=create)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # Exactly one of them won, whichever order the database put them in.
        assert (outcome["rmdir"] is True) != (outcome["create"] is True), outcome
        assert outcome.get("rmdir") in (True, errno.ENOTEMPTY), outcome
        assert outcome.get("create") in (True, errno.ENOENT), outcome
    with psycopg.connect(pg_url) as conn:
        orphans = conn.execute(
            "SELECT count(*) FROM entries e WHERE NOT EXISTS (SELECT 1 FROM inodes i WHERE"
            " i.volume = e.volume AND i.ino = e.parent AND i.nlink > 0)"
        ).fetchone()[0]
    assert orphans == 0


def test_two_hosts_renaming_one_file_lose_no_rename(pg_url, pg_hosts):
    create_volume(pg_url, "v")
    a, b = pg_hosts(), pg_hosts()
    for round_ in range(20):
        src = f"src{round_}"
        (a.mountpoint / src).write_bytes(src.encode())
        wait_until(lambda src=src: (b.mountpoint / src).exists(), "the file on b", FEED_WAIT)
        won: dict[str, object] = {}

        def move(host, target: str, src: str = src, won: dict[str, object] = won) -> None:
            try:
                os.rename(host.mountpoint / src, host.mountpoint / target)
                won[target] = True
            except OSError as exc:
                won[target] = exc.errno

        threads = [
            threading.Thread(target=move, args=(h, t)) for h, t in ((a, "to_a"), (b, "to_b"))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(map(str, won.values())) == ["2", "True"], won  # one won, one ENOENT
        winner = next(t for t, result in won.items() if result is True)
        assert _read(a.mountpoint / winner) == src.encode()
        os.unlink(a.mountpoint / winner)
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM entries").fetchone()[0] == 0


def test_concurrent_writes_into_one_block_lose_nothing(pg_url, pg_hosts):
    create_volume(pg_url, "v")
    a, b = pg_hosts(), pg_hosts()
    (a.mountpoint / "f").write_bytes(b"")
    wait_until(lambda: (b.mountpoint / "f").exists(), "the file on b", FEED_WAIT)

    def fill(host, first: int) -> None:  # every other 1 KiB of the first 64 KiB block
        with open(host.mountpoint / "f", "r+b", buffering=0) as f:
            for piece in range(first, 64, 2):
                os.pwrite(f.fileno(), bytes([piece + 1]) * 1024, piece * 1024)

    threads = [threading.Thread(target=fill, args=(h, i)) for h, i in ((a, 0), (b, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = b"".join(bytes([piece + 1]) * 1024 for piece in range(64))
    wait_until(lambda: _read(a.mountpoint / "f") == want, "both hosts' writes on a", FEED_WAIT)
    assert _read(b.mountpoint / "f") == want


def test_the_quota_is_exact_across_hosts(pg_url, pg_hosts):
    create_volume(pg_url, "v", quota=1 << 20)
    a, b = pg_hosts(), pg_hosts()
    results: dict[str, int] = {}

    def fill(host, key: str) -> None:
        written = 0
        try:
            with open(host.mountpoint / key, "wb", buffering=0) as f:
                while True:
                    written += f.write(bytes(64 * 1024))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        results[key] = written

    threads = [threading.Thread(target=fill, args=(h, k)) for h, k in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["a"] + results["b"] == 1 << 20
    with psycopg.connect(pg_url) as conn:
        used, stored = conn.execute(
            "SELECT used, (SELECT sum(stored) FROM inodes) FROM volumes"
        ).fetchone()
    assert used == stored == 1 << 20


@pytest.mark.expect_log("damaged data in inode")
@pytest.mark.store_damaged("a byte of a block row is flipped")
def test_a_damaged_block_is_eio_and_a_log_line(pg_url, pg_hosts):
    create_volume(pg_url, "v")
    a = pg_hosts()
    (a.mountpoint / "f").write_bytes(os.urandom(200_000))
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE blocks SET data = set_byte(data, 100, get_byte(data, 100) # 1)"
                     " WHERE idx = 1")  # fmt: skip
    b = pg_hosts()  # a host whose kernel has no pages of it yet
    with open(b.mountpoint / "f", "rb") as f:
        assert len(f.read(65536)) == 65536  # block 0 is intact
        with pytest.raises(OSError) as info:
            f.read(65536)
    assert info.value.errno == errno.EIO
    assert "damaged data in inode" in b.log_text()


def test_a_lost_feed_drops_every_cache_and_reconnects(pg_url, pg_hosts):
    create_volume(pg_url, "v")
    a, b = pg_hosts(), pg_hosts()
    (a.mountpoint / "f").write_bytes(b"data")
    os.chmod(a.mountpoint / "f", 0o644)
    assert (b.mountpoint / "f").stat().st_mode & 0o777 == 0o644  # now in b's kernel caches
    with psycopg.connect(pg_url, autocommit=True) as conn:
        # Changes b's feed never hears of (no NOTIFY), as if made while it was disconnected.
        conn.execute("UPDATE inodes SET mode = mode - %s + %s WHERE ino > 1", (0o644, 0o600))
        conn.execute("UPDATE entries SET name = 'g' WHERE name = 'f'")
        assert (b.mountpoint / "f").stat().st_mode & 0o777 == 0o644  # stale, as it should be
        ended = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (f"{FEED_PURPOSE} {b.proc.pid}",),
        ).fetchall()
        assert ended == [(True,)]
    wait_until(lambda: not (b.mountpoint / "f").exists(), "b to drop its cached name", FEED_WAIT)
    assert (b.mountpoint / "g").stat().st_mode & 0o777 == 0o600
    assert "dropped every cache" in b.log_text()
    (a.mountpoint / "h").write_bytes(b"after")  # and the new connection hears again
    wait_until(lambda: (b.mountpoint / "h").exists(), "a change after the reconnection",
               FEED_WAIT)  # fmt: skip


def test_a_listing_shows_the_other_hosts_names(pg_url, pg_hosts):
    create_volume(pg_url, "v")
    a, b = pg_hosts(), pg_hosts()
    os.mkdir(a.mountpoint / "d")
    names = {f"n{i:03}" for i in range(150)}  # more than one prefetch of a listing
    for name in names:
        (a.mountpoint / "d" / name).write_bytes(name.encode())
    with os.scandir(b.mountpoint / "d") as listing:
        seen = {entry.name: entry.stat().st_size for entry in listing}
    assert seen == {name: 4 for name in names}


def test_a_killed_workers_unlinked_open_file_is_freed_at_the_next_start(pg_url, pg_hosts):
    create_volume(pg_url, "v")
    a = pg_hosts()
    (a.mountpoint / "f").write_bytes(b"open when killed")
    held = open(a.mountpoint / "f", "rb")  # noqa: SIM115  (kept open across the kill)
    os.unlink(a.mountpoint / "f")
    os.kill(a.proc.pid, signal.SIGKILL)
    a.proc.wait()
    with contextlib.suppress(OSError):
        held.close()
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM inodes").fetchone()[0] == 2  # still held
        pg_hosts()  # a worker of the same host: the dead one's session and holds go
        assert conn.execute("SELECT count(*) FROM inodes").fetchone()[0] == 1
        assert conn.execute("SELECT inodes, used FROM volumes").fetchone() == (1, 0)


@pytest.mark.expect_log("failed in the store")
def test_an_unreachable_engine_is_eio_and_the_mount_recovers(pg_own, pg_own_hosts):
    create_volume(pg_own.url(), "v")
    host = pg_own_hosts()
    with open(host.mountpoint / "f", "wb", buffering=0) as f:
        f.write(b"before")
        os.fsync(f.fileno())  # fsync() returned: it survives a crash of the database server
    pg_own.halt(signal.SIGQUIT)  # a crash, as if the database host went away
    started = time.monotonic()
    for attempt in (lambda: (host.mountpoint / "g").write_bytes(b"x"),
                    lambda: _read(host.mountpoint / "f")):  # fmt: skip
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EIO
    assert time.monotonic() - started < 30  # bounded: never a hang
    pg_own.run()  # it recovers from its WAL; the mount reconnects by itself
    wait_until(lambda: _read(host.mountpoint / "f") == b"before", "reads to work again",
               timeout=30, ignore=(OSError,))  # fmt: skip
    (host.mountpoint / "g").write_bytes(b"after")
    assert _read(host.mountpoint / "g") == b"after"
    assert "failed in the store" in host.log_text()


def test_the_workers_control_socket_answers_for_an_engine_volume(pg_url, pg_hosts):
    create_volume(pg_url, "v", quota=1 << 30)
    a = pg_hosts()
    (a.mountpoint / "f").write_bytes(bytes(5000))
    path = workerctl.socket_path(a.run_dir, "v")
    status = trio.run(workerctl.call, path, requests.WorkerStatusRequest())
    assert status["pid"] == a.proc.pid and status["mountpoint"] == str(a.mountpoint)
    stats = trio.run(workerctl.call, path, requests.WorkerStatsRequest())
    assert (stats["used"], stats["inodes"], stats["size"]) == (5000, 2, 1 << 30)
    assert pg_url not in repr(status) + repr(stats)  # nor anything of the URL
    with pytest.raises(workerctl.WorkerRefused) as info:
        trio.run(workerctl.call, path, requests.SetLimitsRequest(size=1, inodes=None))
    assert info.value.code == ErrorCode.INVALID
    with open(f"/proc/{a.proc.pid}/cmdline", "rb") as cmdline:
        assert b"postgresql" not in cmdline.read()  # the URL is never on the command line


def test_a_worker_for_a_missing_volume_says_so_on_its_ready_pipe(pg_url, pg_hosts):
    create_volume(pg_url, "v")
    with pytest.raises(AssertionError, match="error: the PostgreSQL engine has no volume nope"):
        pg_hosts("nope")


def test_o_creat_opens_a_file_another_host_made_since_this_kernel_missed_it(pg_url, pg_hosts):
    create_volume(pg_url, "v")
    a, b = pg_hosts(), pg_hosts()
    (a.mountpoint / "g").write_bytes(b"made on a")
    assert not (b.mountpoint / "f").exists()  # a negative entry b's kernel caches
    with psycopg.connect(pg_url, autocommit=True) as conn:
        # "f" appears behind b's feed (no NOTIFY): as if a's create raced b's open(O_CREAT).
        conn.execute("INSERT INTO entries SELECT volume, parent, 'f', ino FROM entries"
                     " WHERE name = 'g'")  # fmt: skip
        conn.execute("UPDATE inodes SET nlink = 2 WHERE ino > 1")
    fd = os.open(b.mountpoint / "f", os.O_RDWR | os.O_CREAT)  # what SQLite's open does
    try:
        assert os.pread(fd, 100, 0) == b"made on a"
    finally:
        os.close(fd)
    (b.mountpoint / "h").exists()  # and with O_EXCL, where it exists: EEXIST
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO entries SELECT volume, parent, 'h', ino FROM entries"
                     " WHERE name = 'g'")  # fmt: skip
        conn.execute("UPDATE inodes SET nlink = 3 WHERE ino > 1")  # the rows agree again
    with pytest.raises(FileExistsError):
        os.close(os.open(b.mountpoint / "h", os.O_RDWR | os.O_CREAT | os.O_EXCL))
