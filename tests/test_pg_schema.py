"""The PostgreSQL engine's volumes as the CLI will manage them (`volfs.pg.schema`): create,
list, remove, with error codes, and the schema's version (a real server, tests/pg.py)."""

from __future__ import annotations

import psycopg
import pytest

from volfs.errors import ErrorCode, VolfsError
from volfs.pg import schema
from volfs.pg.model import PgModel

pytest_plugins = ["pg"]  # its fixtures: pg_server, pg_url


def _code(call, *args, **kwargs) -> ErrorCode:
    with pytest.raises(VolfsError) as info:
        call(*args, **kwargs)
    return info.value.code


def test_create_list_and_remove(pg_url):
    schema.create_volume(pg_url, "media", quota=1 << 30, inode_limit=1000, uid=33, gid=33,
                         mode=0o750)  # fmt: skip
    schema.create_volume(pg_url, "db")
    assert _code(schema.create_volume, pg_url, "media") == ErrorCode.EXISTS
    assert _code(schema.create_volume, pg_url, "x", quota=-1) == ErrorCode.INVALID
    rows = schema.list_volumes(pg_url)
    assert [(r.name, r.quota, r.inode_limit, r.used, r.inodes) for r in rows] == [
        ("db", 0, 0, 0, 1),
        ("media", 1 << 30, 1000, 0, 1),
    ]
    with psycopg.connect(pg_url) as conn:
        root = conn.execute(
            "SELECT uid, gid, mode & 4095, nlink FROM inodes i JOIN volumes v ON v.id = i.volume"
            " WHERE v.name = 'media' AND i.ino = 1"
        ).fetchone()
    assert root == (33, 33, 0o750, 2)
    schema.remove_volume(pg_url, "db")
    assert [r.name for r in schema.list_volumes(pg_url)] == ["media"]
    assert _code(schema.remove_volume, pg_url, "db") == ErrorCode.NOT_FOUND


def test_a_served_volume_is_not_removed(pg_url):
    schema.create_volume(pg_url, "v")
    model = PgModel(pg_url, "v")
    model.open()
    try:
        assert _code(schema.remove_volume, pg_url, "v") == ErrorCode.BUSY
    finally:
        model.close()
    schema.remove_volume(pg_url, "v")


def test_the_schema_is_made_once_and_its_version_checked(pg_url):
    with schema.connect(pg_url) as conn:
        schema.ensure(conn)
        schema.ensure(conn)  # idempotent
        assert conn.execute("SELECT version FROM volfs_schema").fetchall() == [
            (schema.SCHEMA_VERSION,)
        ]
        conn.execute("UPDATE volfs_schema SET version = 99")
        assert _code(schema.ensure, conn) == ErrorCode.STORE
    assert _code(PgModel(pg_url, "nope").open) == ErrorCode.STORE


def test_an_unreachable_engine_is_one_clear_error(pg_server):
    url = pg_server.url("no_such_database")
    with pytest.raises(VolfsError) as info:
        schema.list_volumes(url)
    assert info.value.code == ErrorCode.UNAVAILABLE
    assert "cannot reach the PostgreSQL engine" in str(info.value)


def test_a_password_never_shows_in_an_error(pg_server):
    url = pg_server.url("no_such_database").replace("postgres@", "postgres:s3cret@")
    with pytest.raises(VolfsError) as info:
        schema.list_volumes(url)
    assert "s3cret" not in str(info.value)
