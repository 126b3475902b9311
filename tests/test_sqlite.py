"""SQLite on a volume: many transactions, then a remount, and the database is intact."""

from __future__ import annotations

import sqlite3

import pytest


@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_sqlite_transactions_survive_remount(volume, mnt, journal_mode):
    db = sqlite3.connect(mnt / "app.db")
    db.execute(f"pragma journal_mode={journal_mode}")
    db.execute("create table t (id integer primary key, payload blob)")
    for i in range(300):
        with db:
            db.execute("insert into t (payload) values (randomblob(?))", (100 + i * 7,))
            if i % 10 == 0:
                db.execute("delete from t where id = ?", (i // 2,))
    expected = db.execute("select count(*), sum(length(payload)) from t").fetchone()
    db.close()
    again = volume.remount()
    db = sqlite3.connect(again / "app.db")
    try:
        assert db.execute("pragma integrity_check").fetchone() == ("ok",)
        assert db.execute("select count(*), sum(length(payload)) from t").fetchone() == expected
    finally:
        db.close()
