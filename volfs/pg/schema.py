"""The PostgreSQL engine's tables, their version, connections, and the volumes in a database.

Every table is keyed by the volume's id first, so that one database holds many volumes and a
volume is removed by one cascading delete.  The schema carries its version in a row of its
own (`volfs_schema`); `ensure` creates what is missing and refuses a database whose version
it does not know, so an older volfs never writes tables a newer one changed.

What the feed and the holds need is here too: ``holds`` (which session keeps an unlinked
inode open), ``sessions`` (one row per serving process), and the ``inode_numbers`` sequence,
which hands out inode numbers that are never reused (so the kernel never needs a generation
number), without a row every create would update.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from volfs.errors import ErrorCode, VolfsError

SCHEMA_VERSION = 1
ROOT_INO = 1
#: A file's data is held in rows of at most this many bytes, each one run of one block.
BLOCK_SIZE = 64 * 1024
#: Settings of every connection: serializable transactions (each step is one), commits that
#: reach the database's memory before they return (a `sync` step asks for the disk), and
#: bounds, so a call waits on a stuck database for a bounded time, never forever.
SESSION_OPTIONS = (
    "-c default_transaction_isolation=serializable -c synchronous_commit=off "
    "-c lock_timeout=10s -c statement_timeout=30s -c idle_in_transaction_session_timeout=60s"
)
CONNECT_TIMEOUT = 5  #: seconds

_TABLES = """
CREATE TABLE IF NOT EXISTS volfs_schema (
    version integer PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS volumes (
    id bigserial PRIMARY KEY,
    name text NOT NULL UNIQUE,
    quota bigint NOT NULL DEFAULT 0,
    inode_limit bigint NOT NULL DEFAULT 0,
    used bigint NOT NULL DEFAULT 0,
    inodes bigint NOT NULL DEFAULT 0,
    created timestamptz NOT NULL DEFAULT now()
);
CREATE SEQUENCE IF NOT EXISTS inode_numbers START 2;
CREATE TABLE IF NOT EXISTS inodes (
    volume bigint NOT NULL REFERENCES volumes ON DELETE CASCADE,
    ino bigint NOT NULL,
    mode integer NOT NULL,
    uid bigint NOT NULL,
    gid bigint NOT NULL,
    rdev bigint NOT NULL,
    size bigint NOT NULL,
    stored bigint NOT NULL,
    atime_ns bigint NOT NULL,
    mtime_ns bigint NOT NULL,
    ctime_ns bigint NOT NULL,
    nlink integer NOT NULL,
    target bytea,
    parent bigint NOT NULL,
    nxattrs integer NOT NULL DEFAULT 0,
    PRIMARY KEY (volume, ino)
);
CREATE INDEX IF NOT EXISTS inodes_unlinked ON inodes (volume) WHERE nlink = 0;
CREATE TABLE IF NOT EXISTS entries (
    volume bigint NOT NULL,
    parent bigint NOT NULL,
    name bytea NOT NULL,
    ino bigint NOT NULL,
    PRIMARY KEY (volume, parent, name),
    FOREIGN KEY (volume, parent) REFERENCES inodes ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS xattrs (
    volume bigint NOT NULL,
    ino bigint NOT NULL,
    name bytea NOT NULL,
    value bytea NOT NULL,
    PRIMARY KEY (volume, ino, name),
    FOREIGN KEY (volume, ino) REFERENCES inodes ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS xattrs_by_name ON xattrs (volume, name);
CREATE TABLE IF NOT EXISTS blocks (
    volume bigint NOT NULL,
    ino bigint NOT NULL,
    idx bigint NOT NULL,
    start integer NOT NULL,
    data bytea NOT NULL,
    xxh3 bigint NOT NULL,
    PRIMARY KEY (volume, ino, idx),
    FOREIGN KEY (volume, ino) REFERENCES inodes ON DELETE CASCADE
);
ALTER TABLE blocks ALTER COLUMN data SET STORAGE EXTERNAL;
CREATE TABLE IF NOT EXISTS sessions (
    id uuid PRIMARY KEY,
    volume bigint NOT NULL REFERENCES volumes ON DELETE CASCADE,
    host text NOT NULL,
    pid integer NOT NULL,
    started timestamptz NOT NULL DEFAULT now(),
    synced timestamptz,
    epoch bigint NOT NULL,
    expires timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS holds (
    volume bigint NOT NULL,
    ino bigint NOT NULL,
    session uuid NOT NULL REFERENCES sessions ON DELETE CASCADE,
    PRIMARY KEY (volume, ino, session),
    FOREIGN KEY (volume, ino) REFERENCES inodes ON DELETE CASCADE
);
"""
#: The lease and lock tables (volfs.pg.lease, volfs.pg.locks): a session's epoch (its fencing
#: number, from a sequence, so that no two sessions ever have the same) and expiry are
#: columns of ``sessions`` above; ``locks`` holds POSIX record locks and flock locks;
#: ``volfs_session_live`` is what every step's transaction calls first: it fails (with
#: `SESSION_OVER`) once the session's row is gone, so a session taken over commits nothing.
_LOCK_TABLES = """
CREATE SEQUENCE IF NOT EXISTS session_epochs;
CREATE TABLE IF NOT EXISTS locks (
    volume bigint NOT NULL,
    ino bigint NOT NULL,
    flock boolean NOT NULL,
    session uuid NOT NULL REFERENCES sessions ON DELETE CASCADE,
    owner bigint NOT NULL,
    start bigint NOT NULL,
    stop bigint NOT NULL,
    exclusive boolean NOT NULL,
    pid integer NOT NULL,
    PRIMARY KEY (volume, ino, flock, session, owner, start),
    FOREIGN KEY (volume, ino) REFERENCES inodes ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS locks_by_session ON locks (session);
CREATE OR REPLACE FUNCTION volfs_session_live(sid uuid, ep bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM sessions WHERE id = sid AND epoch = ep) THEN
        RAISE EXCEPTION 'session % (epoch %) is over: another host took it over', sid, ep
            USING ERRCODE = 'VF001';
    END IF;
END $$;
"""
#: The SQLSTATE of `volfs_session_live`'s failure: the session's lease was taken over.
SESSION_OVER = "VF001"


@dataclass(frozen=True)
class VolumeRow:
    """One volume of an engine, as `list_volumes` gives it."""

    name: str
    quota: int
    inode_limit: int
    used: int
    inodes: int
    created: str


def connect(url: str, purpose: str = "volfs") -> psycopg.Connection[Any]:
    """A connection to the engine at *url* (autocommit: transactions are explicit) with the
    session settings above and TCP keepalives (a silently dead peer is found within about
    10 s); `VolfsError` (unavailable) that never shows the URL (it may hold a password).
    *purpose* and the pid name it in ``pg_stat_activity`` (its ``application_name``)."""
    try:
        return psycopg.connect(url, autocommit=True, options=SESSION_OPTIONS,
                               application_name=f"{purpose} {os.getpid()}",
                               connect_timeout=CONNECT_TIMEOUT, keepalives=1,
                               keepalives_idle=5, keepalives_interval=2,
                               keepalives_count=3)  # fmt: skip
    except psycopg.Error as exc:
        raise VolfsError(f"cannot reach the PostgreSQL engine: {first_line(exc)}",
                         ErrorCode.UNAVAILABLE) from None  # fmt: skip


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def ensure(conn: psycopg.Connection[Any]) -> None:
    """Create the tables if they are missing (idempotent, also when two hosts race: the DDL
    runs under an advisory lock); refuse a schema of another version."""
    # The lock is the session's, taken before the transaction: a serializable transaction's
    # snapshot is taken at its first statement, so a lock taken inside it would leave the
    # second of two racing callers a snapshot without the first's version row (and a
    # serialization failure when it inserts its own).
    conn.execute("SELECT pg_advisory_lock(hashtext('volfs_schema'))")
    try:
        _ensure_locked(conn)
    finally:
        conn.execute("SELECT pg_advisory_unlock(hashtext('volfs_schema'))")


def _ensure_locked(conn: psycopg.Connection[Any]) -> None:
    with conn.transaction():
        conn.execute(_TABLES)
        conn.execute(_LOCK_TABLES)
        row = conn.execute("SELECT max(version) FROM volfs_schema").fetchone()
        version = row[0] if row else None
        if version is None:
            conn.execute("INSERT INTO volfs_schema VALUES (%s)", (SCHEMA_VERSION,))
        elif version != SCHEMA_VERSION:
            raise VolfsError(
                f"the PostgreSQL engine holds volfs schema version {version}; this volfs "
                f"knows version {SCHEMA_VERSION}: use a volfs that matches it",
                ErrorCode.STORE,
            )


def volume_id(conn: psycopg.Connection[Any], name: str) -> int:
    """The id of volume *name*; `VolfsError` (not found) if the engine has none."""
    row = conn.execute("SELECT id FROM volumes WHERE name = %s", (name,)).fetchone()
    if row is None:
        raise VolfsError(f"the PostgreSQL engine has no volume {name}", ErrorCode.NOT_FOUND)
    return int(row[0])


def create_volume(url: str, name: str, quota: int = 0, inode_limit: int = 0, uid: int = 0,
                  gid: int = 0, mode: int = 0o755) -> None:  # fmt: skip
    """Create volume *name* with its size (*quota* bytes, 0: none), inode limit and root
    directory (owner, permission bits); `VolfsError` (exists) if the engine has one.

    The caller checks the name (`volfs.catalog`); this checks only what the engine knows."""
    if quota < 0 or inode_limit < 0:
        raise VolfsError("sizes and inode limits cannot be negative", ErrorCode.INVALID)
    with connect(url) as conn:
        ensure(conn)
        try:
            with conn.transaction():
                row = conn.execute(
                    "INSERT INTO volumes (name, quota, inode_limit, inodes) VALUES (%s, %s, %s, 1)"
                    " RETURNING id, extract(epoch FROM created)",
                    (name, quota, inode_limit),
                ).fetchone()
                assert row is not None
                now_ns = int(row[1] * 1_000_000_000)
                conn.execute(
                    "INSERT INTO inodes VALUES (%s, %s, %s, %s, %s, 0, 0, 0, %s, %s, %s, 2, NULL,"
                    " %s)",
                    (row[0], ROOT_INO, stat.S_IFDIR | (mode & 0o7777), uid, gid, now_ns, now_ns,
                     now_ns, ROOT_INO),
                )  # fmt: skip
        except pg_errors.UniqueViolation:
            raise VolfsError(f"the PostgreSQL engine has a volume {name} already",
                             ErrorCode.EXISTS) from None  # fmt: skip


def list_volumes(url: str) -> list[VolumeRow]:
    """Every volume the engine at *url* holds, by name."""
    with connect(url) as conn:
        ensure(conn)
        rows = conn.execute(
            "SELECT name, quota, inode_limit, used, inodes, created::text FROM volumes"
            " ORDER BY name"
        ).fetchall()
    return [VolumeRow(*row) for row in rows]


def remove_volume(url: str, name: str) -> None:
    """Remove volume *name* and everything in it; refused (busy) while a host serves it,
    `VolfsError` (not found) if the engine has none."""
    with connect(url) as conn:
        ensure(conn)
        with conn.transaction():
            found = conn.execute(
                "SELECT id FROM volumes WHERE name = %s FOR UPDATE", (name,)
            ).fetchone()
            if found is None:
                raise VolfsError(f"the PostgreSQL engine has no volume {name}",
                                 ErrorCode.NOT_FOUND)  # fmt: skip
            served = conn.execute(
                "SELECT host, pid FROM sessions WHERE volume = %s LIMIT 1", found
            ).fetchone()
            if served is not None:
                raise VolfsError(f"volume {name} is served on {served[0]} (pid {served[1]}): "
                                 "unmount it there first", ErrorCode.BUSY)  # fmt: skip
            conn.execute("DELETE FROM volumes WHERE id = %s", found)
