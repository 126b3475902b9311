"""The checks of a PostgreSQL volume: what its rows must agree on, each problem one line.

The engine's counterpart of `volfs.store.check`, for `volfsd fsck` of such a volume later and
for the tests now (every test that used a volume of the engine checks it at its end): each
file's ``stored`` is the sum of its block runs and each run is within its block; the volume's
``used`` and ``inodes`` are the sums of its inodes; every entry names an inode; every link
count is what the entries make it (an unlinked inode is 0, which only holds may keep); every
block's checksum holds.
"""

from __future__ import annotations

from typing import Any

import psycopg

from volfs.pg.blocks import checksum
from volfs.pg.schema import BLOCK_SIZE, ROOT_INO

Conn = psycopg.Connection[Any]

_CHECKS = (
    ("stored differs from its blocks",
     "SELECT i.ino FROM inodes i WHERE i.volume = %(v)s AND i.stored <> COALESCE((SELECT"
     " sum(length(b.data)) FROM blocks b WHERE b.volume = i.volume AND b.ino = i.ino), 0)"),
    ("a block run goes past its block",
     "SELECT ino FROM blocks WHERE volume = %(v)s AND (start < 0 OR length(data) = 0 OR"
     " start + length(data) > %(b)s)"),
    ("a block run goes past the end of the file",
     "SELECT b.ino FROM blocks b JOIN inodes i USING (volume, ino) WHERE b.volume = %(v)s"
     " AND b.idx * %(b)s + b.start + length(b.data) > i.size"),
    ("an entry names no inode",
     "SELECT e.parent FROM entries e WHERE e.volume = %(v)s AND NOT EXISTS (SELECT 1 FROM"
     " inodes i WHERE i.volume = e.volume AND i.ino = e.ino)"),
    ("an entry is in a directory that is not one, or was removed",
     "SELECT e.parent FROM entries e JOIN inodes p ON p.volume = e.volume AND p.ino = e.parent"
     " WHERE e.volume = %(v)s AND (p.mode & 61440 <> 16384 OR p.nlink = 0)"),
    ("a file's link count is not its number of entries",
     "SELECT i.ino FROM inodes i WHERE i.volume = %(v)s AND i.mode & 61440 <> 16384 AND"
     " i.nlink <> (SELECT count(*) FROM entries e WHERE e.volume = i.volume AND e.ino = i.ino)"),
    ("a directory's link count is not 2 and its subdirectories",
     "SELECT i.ino FROM inodes i WHERE i.volume = %(v)s AND i.mode & 61440 = 16384 AND"
     " i.nlink > 0 AND i.nlink <> 2 + (SELECT count(*) FROM entries e JOIN inodes c ON"
     " c.volume = e.volume AND c.ino = e.ino WHERE e.volume = i.volume AND e.parent = i.ino"
     " AND c.mode & 61440 = 16384)"),
    ("an unlinked inode nothing holds",
     "SELECT i.ino FROM inodes i WHERE i.volume = %(v)s AND i.nlink = 0 AND i.ino <> %(root)s"
     " AND NOT EXISTS (SELECT 1 FROM holds h WHERE h.volume = i.volume AND h.ino = i.ino)"),
    ("used is not the sum of stored",
     "SELECT id FROM volumes v WHERE id = %(v)s AND used <> (SELECT COALESCE(sum(stored), 0)"
     " FROM inodes WHERE volume = v.id)"),
    ("inodes is not the number of inodes",
     "SELECT id FROM volumes v WHERE id = %(v)s AND inodes <> (SELECT count(*) FROM inodes"
     " WHERE volume = v.id)"),
)  # fmt: skip


def problems(conn: Conn, vid: int, *, unlinked_ok: bool = False) -> list[str]:
    """What is wrong with volume *vid*, one line each (none: it is clean).  With
    *unlinked_ok*, unlinked inodes nothing holds are no problem (a kernel that still has
    them looked up keeps them, and they go at its forget or the next start)."""
    found = []
    params = {"v": vid, "b": BLOCK_SIZE, "root": ROOT_INO}
    for what, query in _CHECKS:
        if unlinked_ok and what == "an unlinked inode nothing holds":
            continue
        rows = conn.execute(query, params).fetchall()
        found += [f"{what} (inode {row[0]})" for row in rows]
    for ino, idx, data, xxh3 in conn.execute(
        "SELECT ino, idx, data, xxh3 FROM blocks WHERE volume = %s", (vid,)
    ):
        if checksum(data) != xxh3:
            found.append(f"block {idx} of inode {ino} fails its checksum")
    return found
