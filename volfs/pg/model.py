"""The PostgreSQL volume model: each step one SERIALIZABLE transaction, in a worker thread.

`PgModel.run` takes a connection from the model's small pool (`POOL_SIZE`), runs the step in a
transaction on it in a thread (psycopg's sync API: its async one is asyncio's), and commits.
A serialization failure or a deadlock (another host's transaction overlapped) rolls the
attempt back and runs the step again on a fresh view, a bounded number of times
(`MAX_ATTEMPTS`, with a short growing pause); what the step raises ends it with nothing
changed.  A lost connection or an unreachable database is EIO for the request (an `OSError`,
logged by the FUSE layer), the connection dropped from the pool, never a hang: every
statement has a timeout (`volfs.pg.schema.SESSION_OPTIONS`).

With its commit each step that changed something tells the other hosts what (`NOTIFY` on
the volume's channel: `volfs.pg.feed` listens and invalidates the kernel's caches).

The model is one *session* of the volume: a row in ``sessions`` made at `open` and removed at
`close`, which its ``holds`` (the inodes open here, so no other host frees them) and its
``locks`` (`volfs.pg.locks`) belong to.  The session holds a lease (`volfs.pg.lease`): once
another host has taken it over, each step's first statement fails, and the model is *over*:
every request is EIO from then on.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import queue
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, cast

import psycopg
import trio
from psycopg import errors as pg_errors

from volfs.errors import VolfsError
from volfs.pg import lease, schema
from volfs.pg.view import PgView

if TYPE_CHECKING:
    from volfs.model import VolumeView

T = TypeVar("T")
log = logging.getLogger(__name__)

#: Connections (and threads) per served volume; the change feed has one more of its own.
POOL_SIZE = 3
MAX_ATTEMPTS = 20
MAX_NAMES = 100_000
#: A NOTIFY payload must stay under 8000 bytes; past this the change is "everything".
MAX_PAYLOAD = 7000
EVERYTHING = "*"
#: A notification a session sends itself: "<session> barrier <token> <inode>" (`lock_taken`).
BARRIER = "barrier"
#: How long a lock granted waits for the feed to catch up (more only while it reconnects,
#: after which it drops every cache anyway).
CATCH_UP_WAIT = 1.0


def channel_of(vid: int) -> str:
    """The NOTIFY channel of volume *vid*."""
    return f"volfs_{vid}"


def encode_changes(session: str, inodes: set[int], entries: set[tuple[int, bytes]],
                   unlocked: set[int] | None = None) -> str:  # fmt: skip
    """The payload that tells other hosts what a commit changed: JSON with the session (so
    the sender skips its own), inode numbers and (parent, hex name) of entries, and ("l")
    the inodes where locks were released; or `EVERYTHING` after the session if that does
    not fit."""
    changes: dict[str, object] = {"s": session, "i": sorted(inodes)}
    changes["e"] = [[p, n.hex()] for p, n in sorted(entries)]
    if unlocked:
        changes["l"] = sorted(unlocked)
    payload = json.dumps(changes, separators=(",", ":"))
    return payload if len(payload) <= MAX_PAYLOAD else f"{session} {EVERYTHING}"


class _Pool:
    """A few connections to one database, each used by one thread at a time."""

    def __init__(self, url: str, size: int) -> None:
        self._url = url
        self._idle: queue.SimpleQueue[psycopg.Connection[Any]] = queue.SimpleQueue()
        self._made = 0
        self._size = size
        self._lock = threading.Lock()
        self.limiter = trio.CapacityLimiter(size)  #: no more threads than connections

    def take(self) -> psycopg.Connection[Any]:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._made < self._size:
                self._made += 1
                try:
                    return schema.connect(self._url)
                except BaseException:
                    self._made -= 1
                    raise
        return self._idle.get()

    def give(self, conn: psycopg.Connection[Any], broken: bool) -> None:
        if broken or conn.closed:
            conn.close()
            with self._lock:
                self._made -= 1
        else:
            self._idle.put(conn)

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


class PgModel:
    """`volfs.model.VolumeModel` of volume *name* in the engine at *url*, one session."""

    def __init__(self, url: str, name: str, host: str | None = None,
                 lease_seconds: float = lease.LEASE) -> None:  # fmt: skip
        self.name = name
        self.url = url
        self.host = host or socket.gethostname()
        self.session = str(uuid.uuid4())
        self.epoch = 0  #: the session's fencing number, given at `open`
        self.over = False  #: another host took the session over: every step fails
        self.lease = lease.Keeper(self, lease_seconds)
        self.vid = 0
        self.channel = ""
        self._pool = _Pool(url, POOL_SIZE)
        #: This process's references by inode number: [lookups, opens].
        self._counts: dict[int, list[int]] = {}
        self.held: set[int] = set()  #: inodes this session has a ``holds`` row for
        self.retries = 0  #: attempts run again after a serialization failure or deadlock
        #: (parent, name) of the entries steps looked up, newest last, at most `MAX_NAMES`:
        #: what the kernel may have cached, for the feed to drop when it missed changes.
        self._names: dict[tuple[int, bytes], None] = {}
        self._names_lock = threading.Lock()
        self._running = threading.local()  #: the view of the step this thread runs
        #: Lock requests waiting for a release on an inode (`unlock_event`), and the inodes
        #: whose locks steps released since their waiters were last woken.
        self._unlock_events: dict[int, trio.Event] = {}
        self._released: set[int] = set()
        self._released_lock = threading.Lock()
        self._barriers: dict[int, trio.Event] = {}  #: `lock_taken`'s, by token
        self._next_barrier = 0

    # -- the session ----------------------------------------------------------------------

    def open(self) -> None:
        """Find the volume, start this session (its row, its lease), and take over the
        sessions of this host whose process is gone (`volfs.pg.lease.sweep`: then every
        unlinked inode no session holds is freed too)."""
        with schema.connect(self.url) as conn:
            schema.ensure(conn)
            self.vid = schema.volume_id(conn, self.name)
            self.channel = channel_of(self.vid)
            with conn.transaction():
                row = conn.execute(
                    "INSERT INTO sessions (id, volume, host, pid, epoch, expires) VALUES (%s, %s,"
                    " %s, %s, nextval('session_epochs'), clock_timestamp() + make_interval(secs"
                    " => %s)) RETURNING epoch",
                    (self.session, self.vid, self.host, os.getpid(), self.lease.seconds),
                ).fetchone()
                assert row is not None
                self.epoch = int(row[0])
            lease.retried(lambda: lease.sweep(conn, self, free=True))

    def is_gone(self, host: str, pid: int, expired: bool) -> bool:
        """Whether a session of *host* and *pid* whose lease *expired* (or not) is over: its
        process on this host is gone, or its lease expired and this session may take others
        over (`volfs.pg.lease.Keeper.may_take_over`)."""
        if host == self.host and not _alive(pid):
            return True
        return expired and self.lease.may_take_over()

    def sweep_soon(self) -> None:
        """Have the lease keeper free what sessions taken over held, at its next round."""
        self.lease.sweep_due = True

    def end(self, why: str) -> None:
        """The session is over (*why*): every request fails with EIO from now on."""
        if not self.over:
            self.over = True
            log.error("volume %s: session %s is over (%s): every request fails with EIO until"
                      " the volume is mounted again", self.name, self.session, why)  # fmt: skip

    @property
    def limiter(self) -> trio.CapacityLimiter:
        """What bounds the threads that use the pool's connections."""
        return self._pool.limiter

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection of the pool for the calling thread (a lost one is not given back)."""
        conn = self._pool.take()
        broken = True
        try:
            yield conn
            broken = False
        finally:
            self._pool.give(conn, broken)

    def notify(self, conn: psycopg.Connection[Any], inodes: set[int],
               entries: set[tuple[int, bytes]], unlocked: set[int]) -> None:  # fmt: skip
        """Tell the other hosts, with the commit of *conn*'s transaction, what it changed."""
        conn.execute("SELECT pg_notify(%s, %s)", (self.channel, encode_changes(
            self.session, inodes, entries, unlocked)))  # fmt: skip

    # -- lock waiters ------------------------------------------------------------------------

    async def lock_taken(self, ino: int) -> None:
        """`volfs.model.VolumeModel.lock_taken`: a barrier through the change feed.  This
        session NOTIFYs itself; notifications arrive in the order of their commits, so once
        the feed has handled this one (and, with it, dropped the kernel's cache of *ino*),
        it has handled every change committed before the lock, the last holder's among
        them.  At most `CATCH_UP_WAIT` (the feed may be reconnecting)."""
        self._next_barrier += 1
        token = self._next_barrier
        passed = self._barriers[token] = trio.Event()
        try:
            await trio.to_thread.run_sync(self._send_barrier, token, ino,
                                          limiter=self._pool.limiter)  # fmt: skip
            with trio.move_on_after(CATCH_UP_WAIT):
                await passed.wait()
        finally:
            del self._barriers[token]

    def _send_barrier(self, token: int, ino: int) -> None:
        try:
            with self.connection() as conn:  # autocommit: sent at once
                conn.execute("SELECT pg_notify(%s, %s)",
                             (self.channel, f"{self.session} {BARRIER} {token} {ino}"))  # fmt: skip
        except (psycopg.Error, VolfsError) as exc:  # the lock stands; only the wait is cut
            log.warning("volume %s: no barrier after a lock: %s", self.name,
                        schema.first_line(exc))  # fmt: skip

    def barrier_passed(self, token: int) -> None:
        """The feed has handled this session's barrier *token* (`lock_taken`)."""
        event = self._barriers.get(token)
        if event is not None:
            event.set()

    def unlock_event(self, ino: int) -> trio.Event:
        """`volfs.model.VolumeModel.unlock_event` (on the trio thread)."""
        event = self._unlock_events.get(ino)
        if event is None:
            event = self._unlock_events[ino] = trio.Event()
        return event

    def wake(self, inodes: set[int] | None) -> None:
        """Wake the lock requests waiting on *inodes* (None: on every inode) and on what
        this host's steps released (on the trio thread: `run`, the feed, the lease keeper)."""
        with self._released_lock:
            released, self._released = self._released, set()
        events = self._unlock_events
        if inodes is None:
            woken, self._unlock_events = list(events.values()), {}
        else:
            woken = [events.pop(ino) for ino in inodes | released if ino in events]
        for event in woken:
            event.set()

    def close(self) -> None:
        """End the session: its holds go with its row (so other hosts may free what was open
        here); the connections close."""
        try:
            with schema.connect(self.url) as conn, conn.transaction():
                conn.execute("DELETE FROM sessions WHERE id = %s", (self.session,))
        except Exception as exc:  # the database is gone: a later start of this host cleans up
            log.warning("volume %s: could not end session %s: %s", self.name, self.session, exc)
        finally:
            self._pool.close()

    # -- references -------------------------------------------------------------------------

    def count_of(self, ino: int, which: int) -> int:
        counts = self._counts.get(ino)
        return 0 if counts is None else counts[which]

    def add_count(self, ino: int, which: int, delta: int) -> None:
        counts = self._counts.setdefault(ino, [0, 0])
        counts[which] += delta
        if counts == [0, 0]:
            del self._counts[ino]

    def referenced(self) -> list[int]:
        """The inodes the kernel (or an open handle) holds here."""
        return list(self._counts)

    def looked_up(self, parent: int, name: bytes) -> None:
        """Note that a step looked *name* up in *parent* (found or not)."""
        key = (parent, name)
        with self._names_lock:
            self._names.pop(key, None)
            self._names[key] = None
            if len(self._names) > MAX_NAMES:
                del self._names[next(iter(self._names))]

    def names_seen(self) -> list[tuple[int, bytes]]:
        with self._names_lock:
            return list(self._names)

    # -- steps ------------------------------------------------------------------------------

    def current_view(self) -> PgView | None:
        """The view of the step the calling thread runs, if any."""
        view: PgView | None = getattr(self._running, "view", None)
        return view

    async def run(self, step: Callable[[VolumeView], T]) -> T:
        """Run *step* in a worker thread as one serializable transaction (again after a
        serialization failure or deadlock; see the module's docstring); then wake the lock
        requests waiting on what it released."""
        try:
            return await trio.to_thread.run_sync(self.run_sync, step, limiter=self._pool.limiter)
        finally:
            if self._released:
                self.wake(set())

    def run_sync(self, step: Callable[[VolumeView], T]) -> T:
        """`run`, in the calling thread."""
        if self.over:
            raise OSError(errno.EIO, f"volume {self.name}: this host's session is over")
        try:
            conn = self._pool.take()
        except VolfsError as exc:  # the engine cannot be reached: this request fails
            raise OSError(errno.EIO, str(exc)) from None
        broken = False
        try:
            return self._attempts(conn, step)
        except psycopg.OperationalError as exc:
            broken = True
            raise OSError(errno.EIO, f"the PostgreSQL engine: {schema.first_line(exc)}") from None
        finally:
            self._pool.give(conn, broken)

    def _attempts(self, conn: psycopg.Connection[Any], step: Callable[[VolumeView], T]) -> T:
        for attempt in range(MAX_ATTEMPTS):
            view = self._running.view = PgView(self, conn)
            returned = False
            try:
                # Pipelined: a statement whose result the step does not read (BEGIN, the
                # changes, NOTIFY) costs no round trip of its own.
                with conn.pipeline(), conn.transaction():
                    # Fails, and with it the step, once the session was taken over.
                    conn.execute("SELECT volfs_session_live(%s, %s)", (self.session, self.epoch))
                    result = step(cast("VolumeView", view))
                    returned = True
                    view.finish()
                    if view.changed_inodes or view.changed_entries or view.unlocked:
                        self.notify(conn, view.changed_inodes, view.changed_entries,
                                    view.unlocked)  # fmt: skip
            except (pg_errors.SerializationFailure, pg_errors.DeadlockDetected):
                if returned and not view.wrote:
                    # A step that only read, refused at its commit: what it read is one
                    # snapshot of the volume (what REPEATABLE READ gives), and running it
                    # again would repeat what it did outside the view (readdir's replies).
                    view.active = False
                    self._running.view = None
                    return result
                view.undo_counts()
                view.active = False
                self._running.view = None
                self.retries += 1
                time.sleep(random.uniform(0, 0.001 * (attempt + 1) ** 2))
                continue
            except BaseException as exc:
                view.undo_counts()
                view.active = False
                self._running.view = None
                if isinstance(exc, psycopg.Error) and exc.sqlstate == schema.SESSION_OVER:
                    self.end("another host took it over: its lease had expired")
                    raise OSError(errno.EIO, f"volume {self.name}: this host's session is "
                                             "over") from None  # fmt: skip
                raise
            view.active = False
            self._running.view = None
            for done in view.after_commit:
                done()
            if view.unlocked:
                with self._released_lock:
                    self._released |= view.unlocked
            return result
        raise OSError(errno.EIO, f"volume {self.name}: a step failed to serialize "
                                 f"{MAX_ATTEMPTS} times")  # fmt: skip


def _alive(pid: int) -> bool:
    """Whether process *pid* of this host still runs.  A zombie does not: a worker killed
    a moment ago may not be reaped yet when the one that replaces it starts (a heal)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != b"Z"
