"""Real programs on a volume of the PostgreSQL engine: SQLite (Python's own module) and git,
and what one host wrote read by the other (tests/pg.py starts the server and the hosts)."""

from __future__ import annotations

import sqlite3
import subprocess

import pytest

from volfs.pg.schema import create_volume

pytest_plugins = ["pg"]  # its fixtures: pg_server, pg_url, pg_hosts


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_sqlite_on_a_pg_volume(pg_url, pg_hosts, journal):
    create_volume(pg_url, "v")
    a, b = pg_hosts(), pg_hosts()
    db = sqlite3.connect(a.mountpoint / "app.db")
    db.execute(f"PRAGMA journal_mode={journal}")
    db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)")
    for batch in range(20):
        with db:
            db.executemany("INSERT INTO t (v) VALUES (?)",
                           [(f"row {batch}-{i}" * 10,) for i in range(50)])  # fmt: skip
    with db:
        db.execute("DELETE FROM t WHERE k % 3 = 0")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()
    other = sqlite3.connect(b.mountpoint / "app.db")  # after the close: current on b
    try:
        assert other.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert other.execute("SELECT count(*) FROM t").fetchone() == (1000 - 333,)
    finally:
        other.close()


def test_git_on_a_pg_volume(pg_url, pg_hosts):
    create_volume(pg_url, "v")
    a, b = pg_hosts(), pg_hosts()
    repo = a.mountpoint / "repo"
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid",
           "HOME": str(a.base), "PATH": "/usr/bin:/bin"}  # fmt: skip

    def git(*args: str, cwd=repo) -> str:
        done = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    git("init", "-q", str(repo), cwd=a.mountpoint)
    for i in range(30):
        (repo / f"file{i}.txt").write_text(f"content {i}\n" * (i + 1))
    git("add", ".")
    git("commit", "-qm", "first")
    (repo / "file0.txt").write_text("changed\n")
    git("commit", "-qam", "second")
    git("gc", "-q")
    git("fsck", "--strict")
    assert git("log", "--format=%s", cwd=b.mountpoint / "repo").split() == ["second", "first"]
    git("fsck", "--strict", cwd=b.mountpoint / "repo")
