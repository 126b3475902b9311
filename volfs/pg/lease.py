"""Host leases of a PostgreSQL volume: each session (one serving process) holds a lease that
it renews, and a session whose lease expired is over for every host.

A session's row carries an ``epoch`` (from a sequence, its own for ever) and ``expires`` (the
database's clock, so hosts' clocks never matter).  `keep` renews it every third of the lease
(`LEASE` unless the worker is told otherwise) and sweeps: every session of the volume that is
gone (`volfs.pg.model.PgModel.is_gone`) is taken over, its row deleted with its holds and
locks, and then every unlinked inode no session holds any more is freed.  A lock request that
meets a gone session's lock takes it over at once (`volfs.pg.locks`).

Expiry decides, not the connection: a SIGSTOPped host keeps its connections open.  Once its
row is gone, none of its transactions can commit (each step calls ``volfs_session_live``
first; `volfs.pg.schema`), so a host that wakes up finds every request failing with EIO
instead of writing over what another host did under a lock it thought it held; it has to be
mounted again.  A host takes others over only after it has itself renewed without a failure
for a whole lease: after an outage of the database every host gets that long to renew its
own lease before any of them ends another's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
import trio
from psycopg import errors as pg_errors

from volfs.errors import VolfsError
from volfs.pg import schema

if TYPE_CHECKING:
    from volfs.pg.model import PgModel

T = TypeVar("T")
log = logging.getLogger(__name__)

#: Seconds a session's lease lasts: a dead or stopped host's locks and holds go this long
#: (and at most one renewal interval more) after its last renewal.
LEASE = 15.0
RENEWALS_PER_LEASE = 3
_ATTEMPTS = 5  #: a renewal or sweep run again after a serialization failure

_RENEW = (
    "UPDATE sessions SET expires = clock_timestamp() + make_interval(secs => %s)"
    " WHERE id = %s AND epoch = %s RETURNING 1"
)
_OTHERS = (
    "SELECT id::text, host, pid, expires < clock_timestamp() FROM sessions"
    " WHERE volume = %s AND id <> %s"
)
_LOCKED_BY = "SELECT DISTINCT ino FROM locks WHERE session = ANY(%s::uuid[])"
_END = "DELETE FROM sessions WHERE id = ANY(%s::uuid[]) RETURNING id::text, host, pid"
_FREE_UNHELD = (
    "DELETE FROM inodes i WHERE volume = %s AND nlink = 0 AND ino <> %s AND NOT EXISTS"
    " (SELECT 1 FROM holds h WHERE h.volume = i.volume AND h.ino = i.ino) RETURNING stored"
)


class Keeper:
    """What model *model* knows of its own lease: whether it still has it, and since when it
    has renewed it without a failure (`may_take_over`)."""

    def __init__(self, model: PgModel, seconds: float) -> None:
        self.model = model
        self.seconds = seconds
        self.contact_since: float | None = time.monotonic()  #: None after a failed renewal
        self.sweep_due = True

    def may_take_over(self) -> bool:
        """Whether this session may end another whose lease expired: only once its own
        renewals have succeeded for a whole lease (see the module's docstring)."""
        since = self.contact_since
        return since is not None and time.monotonic() - since >= self.seconds

    async def keep(self) -> None:
        """Renew the lease and sweep, every third of the lease, until cancelled."""
        while True:
            await trio.sleep(self.seconds / RENEWALS_PER_LEASE)
            released = await trio.to_thread.run_sync(self._renew_and_sweep,
                                                     limiter=self.model.limiter)  # fmt: skip
            self.model.wake(released)

    def _renew_and_sweep(self) -> set[int] | None:
        """One renewal (and a sweep if one is due): the inodes whose locks the sweep
        released (None: all of them may have been)."""
        model = self.model
        if model.over:
            return set()
        try:
            with model.connection() as conn:
                if not retried(lambda: self.renew(conn)):
                    model.end("its lease was taken over by another host")
                    return None
                free, self.sweep_due = self.sweep_due, False
                return retried(lambda: sweep(conn, model, free))
        except (psycopg.Error, OSError, VolfsError) as exc:
            if self.contact_since is not None:
                log.warning("volume %s: cannot renew the lease of session %s: %s", model.name,
                            model.session, schema.first_line(exc))  # fmt: skip
            self.contact_since = None
        return set()

    def renew(self, conn: psycopg.Connection[Any]) -> bool:
        """Extend the lease; False if the session is over (taken over by another host).

        One statement in autocommit, never a transaction left open between statements: a
        host stopped there would hold its session's row lock, and another host's takeover
        would wait for it (until ``lock_timeout``)."""
        found = conn.execute(_RENEW, (self.seconds, self.model.session,
                                      self.model.epoch)).fetchone()  # fmt: skip
        if found is not None and self.contact_since is None:
            self.contact_since = time.monotonic()
            log.info("volume %s: lease of session %s renewed again", self.model.name,
                     self.model.session)  # fmt: skip
        return found is not None


def sweep(conn: psycopg.Connection[Any], model: PgModel, free: bool) -> set[int]:
    """Take over every gone session of the volume, then (if any, or *free*) free the unlinked
    inodes no session holds (an open-but-unlinked file of a host that died); the inodes whose
    locks went."""
    with conn.transaction():
        rows = conn.execute(_OTHERS, (model.vid, model.session)).fetchall()
        gone = [sid for sid, host, pid, expired in rows if model.is_gone(host, pid, expired)]
        released = end_sessions(conn, model, gone) if gone else set()
        if gone or free:
            freed = conn.execute(_FREE_UNHELD, (model.vid, schema.ROOT_INO)).fetchall()
            if freed:
                conn.execute("UPDATE volumes SET used = used - %s, inodes = inodes - %s"
                             " WHERE id = %s", (sum(s for (s,) in freed), len(freed),
                                                model.vid))  # fmt: skip
                log.info("volume %s: freed %d unlinked inodes no host holds", model.name,
                         len(freed))  # fmt: skip
        if released:
            model.notify(conn, set(), set(), released)
    return released


def end_sessions(conn: psycopg.Connection[Any], model: PgModel, sessions: list[str]) -> set[int]:
    """Take gone *sessions* over in the caller's transaction: their rows go, with their holds
    and locks; the inodes whose locks went (for the caller's NOTIFY)."""
    released = {ino for (ino,) in conn.execute(_LOCKED_BY, (sessions,))}
    for sid, host, pid in conn.execute(_END, (sessions,)):
        log.info("volume %s: taking over session %s of %s (pid %d): its lease expired or its"
                 " process is gone", model.name, sid, host, pid)  # fmt: skip
    return released


def retried(call: Callable[[], T]) -> T:
    """*call*, run again after a serialization failure (a few times, with short pauses)."""
    for attempt in range(_ATTEMPTS):
        try:
            return call()
        except pg_errors.SerializationFailure:
            if attempt == _ATTEMPTS - 1:
                raise
            time.sleep(0.001 * (attempt + 1) ** 2)
    raise AssertionError("unreachable")
