"""Locks of a PostgreSQL volume, held in the database so that they hold across hosts.

Two kinds, independent of each other as on Linux: POSIX record locks (``fcntl``: byte
ranges, read or write) and flock locks (the whole file, shared or exclusive).  A lock belongs
to an *owner*: a session (one serving process, `volfs.pg.model.PgModel`) and the owner the
kernel names (POSIX: the process's file table; flock: the open file).  The rules are pure
functions (`conflict`, `posix_change`, `flock_change`); `take`, `conflicting` (F_GETLK) and
`release` apply them to the rows of one inode inside a step's transaction (SERIALIZABLE: two
hosts taking conflicting locks at once cannot both commit).

POSIX's rules: a request replaces the owner's locks over its range, cutting them (a lock
over a sub-range's both sides is split in two); the owner's locks of one type that overlap
or touch are merged; a write lock conflicts with any lock of another owner on an overlapping
byte, a read lock with another owner's write lock.  A refused POSIX request changes nothing.
A refused flock conversion (shared to exclusive, or back) drops the owner's old lock, as
Linux does (two holders of a shared lock that both ask for an exclusive one must not wait for
each other forever).

A lock of a session that is gone (`volfs.pg.model.PgModel.is_gone`: its lease expired, or
its process on this host died) conflicts with nothing: a request that meets one takes that
session over (deletes its row, and with it its locks and holds), in the same transaction, so
the gone session can commit nothing after it (`volfs.pg.lease`).

Not done: deadlock detection (F_SETLKW never answers EDEADLK); a waiter tries again when a
lock of the inode is released (NOTIFY) or after `volfs.fsops.LOCK_RECHECK`.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

from pyfuse3 import LockRange

from volfs.pg import lease

if TYPE_CHECKING:
    from volfs.pg.view import PgView

log = logging.getLogger(__name__)

#: A lock's end meaning "however far the file grows" (POSIX: a length of 0).
TO_END = (1 << 63) - 1
_OWNER_BITS = 1 << 64  #: the kernel's owners are unsigned 64-bit; a bigint column is signed


class Lock(NamedTuple):
    """One lock: bytes [start, stop) of a file (flock: all of it)."""

    session: str
    owner: int
    exclusive: bool
    start: int
    stop: int  #: past the last byte; `TO_END`: to the end of the file
    pid: int  #: the process that took it (F_GETLK shows it)


def span(start: int, length: int) -> tuple[int, int]:
    """[start, stop) of a POSIX range given by its start and length (0: to the end)."""
    return start, TO_END if length == 0 else min(start + length, TO_END)


def conflict(held: Iterable[Lock], wanted: Lock) -> Lock | None:
    """The first lock of *held* of another owner that *wanted* may not coexist with."""
    for lock in held:
        if ((lock.session, lock.owner) != (wanted.session, wanted.owner)
                and lock.start < wanted.stop and wanted.start < lock.stop
                and (lock.exclusive or wanted.exclusive)):  # fmt: skip
            return lock
    return None


def posix_change(own: Iterable[Lock], wanted: Lock, unlock: bool = False) -> list[Lock]:
    """One owner's POSIX locks *own* after a request for *wanted*'s range: the range cut out
    of them, then (unless *unlock*) *wanted* added, merged with those of its type that
    touch it.  Sorted by start."""
    kept: list[Lock] = []
    for lock in own:
        if lock.stop <= wanted.start or wanted.stop <= lock.start:
            kept.append(lock)
            continue
        if lock.start < wanted.start:
            kept.append(lock._replace(stop=wanted.start))
        if wanted.stop < lock.stop:
            kept.append(lock._replace(start=wanted.stop))
    if unlock:
        return sorted(kept, key=lambda lock: lock.start)
    new, result = wanted, []
    for lock in sorted(kept, key=lambda lock: lock.start):
        if lock.exclusive == new.exclusive and lock.start <= new.stop and new.start <= lock.stop:
            new = new._replace(start=min(lock.start, new.start), stop=max(lock.stop, new.stop))
        else:
            result.append(lock)
    result.append(new)
    return sorted(result, key=lambda lock: lock.start)


def flock_change(own: Iterable[Lock], wanted: Lock, unlock: bool = False) -> list[Lock]:
    """One owner's flock locks after a request: at most one, the file whole."""
    return [] if unlock else [wanted._replace(start=0, stop=TO_END)]


def stored_owner(owner: int) -> int:
    """The kernel's unsigned owner as the signed number the column holds."""
    return owner - _OWNER_BITS if owner >= _OWNER_BITS // 2 else owner


# -- the rows -------------------------------------------------------------------------------

_HELD = (
    "SELECT l.session::text, l.owner, l.exclusive, l.start, l.stop, l.pid, s.host, s.pid,"
    " s.expires < clock_timestamp() FROM locks l JOIN sessions s ON s.id = l.session"
    " WHERE l.volume = %s AND l.ino = %s AND l.flock = %s ORDER BY l.start"
)
_DROP_OWN = (
    "DELETE FROM locks WHERE volume = %s AND ino = %s AND flock = %s AND session = %s"
    " AND owner = %s"
)
_INSERT = (
    "INSERT INTO locks (volume, ino, flock, session, owner, exclusive, start, stop, pid)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
_DROP_OWNER = (
    "DELETE FROM locks WHERE volume = %s AND ino = %s AND session = %s AND owner = %s RETURNING 1"
)
_ANY_LEFT = "SELECT 1 FROM locks WHERE volume = %s AND ino = %s AND session = %s LIMIT 1"


def _live_locks(view: PgView, ino: int, flock: bool, take_over: bool) -> list[Lock]:
    """The locks of inode *ino* (of one kind) whose sessions are not gone; with *take_over*,
    the gone sessions among them are taken over (`take_over_sessions`)."""
    live, gone = [], set()
    for *fields, host, pid, expired in view.conn.execute(_HELD, (view.vid, ino, flock)):
        lock = Lock(*fields)
        if lock.session != view.model.session and view.model.is_gone(host, pid, expired):
            gone.add(lock.session)
        else:
            live.append(lock)
    if gone and take_over:
        take_over_sessions(view, sorted(gone))
    return live


def take_over_sessions(view: PgView, sessions: list[str]) -> None:
    """End gone *sessions* in this step (`volfs.pg.lease.end_sessions`): the waiters on their
    locks' inodes are woken by the commit's NOTIFY, and the lease keeper frees what only
    they held."""
    view.unlocked.update(lease.end_sessions(view.conn, view.model, sessions))
    view.after_commit.append(view.model.sweep_soon)


def _wanted(view: PgView, owner: int, exclusive: bool, start: int, stop: int, pid: int) -> Lock:
    return Lock(view.model.session, stored_owner(owner), exclusive, start, stop, pid)


def take(view: PgView, ino: int, owner: int, flock: bool, lock: LockRange) -> bool:
    """Take, change or release (type ``F_UNLCK``) a lock of *owner* on inode *ino*
    (*flock*: a flock lock, its range ignored); False if another owner's lock conflicts."""
    unlock = lock.type == fcntl.F_UNLCK
    wanted = _wanted(view, owner, lock.type == fcntl.F_WRLCK, *span(lock.start, lock.length),
                     lock.pid)  # fmt: skip
    held = _live_locks(view, ino, flock, take_over=not unlock)
    own = [h for h in held if (h.session, h.owner) == (wanted.session, wanted.owner)]
    change = flock_change if flock else posix_change
    if not unlock and conflict(held, wanted) is not None:
        if flock and own:  # a conversion: the old lock goes first (see the docstring)
            _store(view, ino, flock, wanted, own, [])
        return False
    _store(view, ino, flock, wanted, own, change(own, wanted, unlock))
    return True


def _store(view: PgView, ino: int, flock: bool, wanted: Lock, own: list[Lock],
           new: list[Lock]) -> None:  # fmt: skip
    """Replace the owner's locks *own* with *new* (nothing if they are the same)."""
    if own == new:
        return
    # A step that wrote must run again after a serialization failure: it is no reader
    # whose snapshot may stand (`PgModel._attempts`), and a lock it "took" would be gone.
    view.wrote_rows = True
    view.conn.execute(_DROP_OWN, (view.vid, ino, flock, wanted.session, wanted.owner))
    for lock in new:
        view.conn.execute(_INSERT, (view.vid, ino, flock, *lock))
    if own:  # something of the owner's went or shrank: waiters may go on
        view.unlocked.add(ino)


def conflicting(view: PgView, ino: int, owner: int, lock: LockRange) -> LockRange:
    """F_GETLK: a POSIX lock of another owner that conflicts with *lock*, or *lock* with
    type ``F_UNLCK`` if none does."""
    wanted = _wanted(view, owner, lock.type == fcntl.F_WRLCK, *span(lock.start, lock.length),
                     lock.pid)  # fmt: skip
    found = conflict(_live_locks(view, ino, False, take_over=False), wanted)
    if found is None:
        return lock._replace(type=fcntl.F_UNLCK)
    length = 0 if found.stop == TO_END else found.stop - found.start
    return LockRange(fcntl.F_WRLCK if found.exclusive else fcntl.F_RDLCK, found.start, length,
                     found.pid)  # fmt: skip


def release(view: PgView, ino: int, owner: int) -> bool:
    """Drop every lock (both kinds) of *owner* on inode *ino*; whether this session holds any
    lock of the inode after that."""
    session = view.model.session
    owner = stored_owner(owner)
    dropped = view.conn.execute(_DROP_OWNER, (view.vid, ino, session, owner)).fetchall()
    if dropped:
        view.unlocked.add(ino)
    return view.conn.execute(_ANY_LEFT, (view.vid, ino, session)).fetchone() is not None
