"""The change feed of a PostgreSQL volume: what other hosts commit, made visible here.

Each commit that changes a volume sends a NOTIFY on its channel (`volfs.pg.model`): the
inode numbers and the (parent, name) entries it changed.  `ChangeFeed` listens on a
connection of its own, driven by trio (`wait_readable` on its socket, libpq's non-blocking
input calls), and for every change of another session drops what the kernel may have cached:
`pyfuse3.invalidate_inode` (attributes and pages) for each inode the kernel knows here,
`pyfuse3.invalidate_entry` for each entry under a directory it knows.

Invalidations run in a thread of their own, never in a request handler: the kernel may make
an invalidation wait for a request it is serving for that inode or directory (fuse-facts.md),
and the trio thread must go on serving it meanwhile.

A lock taken here waits for a *barrier*: a notification this session sends itself
(`volfs.pg.model.PgModel.lock_taken`).  Notifications arrive in the order of their commits,
so the barrier is passed once everything received before it has been invalidated (and the
locked inode too): what another host wrote before it released the lock is visible here.

A feed that loses its connection has missed what was committed until it listens again: it
reconnects (with a growing pause), LISTENs, and only then drops every cache this process may
have (every inode the kernel holds, every name steps looked up): a change committed before the
LISTEN is covered by that drop, one after it by a notification.
"""

from __future__ import annotations

import errno
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

import psycopg
import trio

from volfs.errors import VolfsError
from volfs.pg import schema
from volfs.pg.model import BARRIER, EVERYTHING, PgModel
from volfs.pg.schema import ROOT_INO

log = logging.getLogger(__name__)

RECONNECT_FIRST = 0.1  #: seconds before the first reconnection, doubled up to the next
RECONNECT_MOST = 5.0
FEED_PURPOSE = "volfs-feed"  #: its connection's application_name (with the pid)

InvalidateInode = Callable[[int], None]
InvalidateEntry = Callable[[int, bytes], None]


class ChangeFeed:
    """Listen for volume *model*'s changes by other hosts; invalidate through the two calls
    (pyfuse3's, or a test's)."""

    def __init__(self, model: PgModel, inode: InvalidateInode, entry: InvalidateEntry) -> None:
        self.model = model
        self._inode = inode
        self._entry = entry
        self._inodes: set[int] = set()
        self._entries: set[tuple[int, bytes]] = set()
        self._barriers: list[int] = []  #: this session's, to pass once what came before is done
        self._wake = trio.Event()
        self.connected = trio.Event()  #: set while listening (for tests and status)
        self.drops = 0  #: how often every cache was dropped after a lost connection
        self.notices = 0  #: notifications from other sessions handled

    async def run(self) -> None:
        """Listen and invalidate until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._invalidating)
            await self._listening()

    async def _listening(self) -> None:
        pause = RECONNECT_FIRST
        lost = False
        while True:
            conn = None
            try:
                conn = await trio.to_thread.run_sync(self._listen)
                if lost:  # what was committed while nobody listened: everything goes
                    self._everything()
                    self.drops += 1
                    log.info("volume %s: change feed listening again; dropped every cache",
                             self.model.name)  # fmt: skip
                pause = RECONNECT_FIRST
                self.connected.set()
                await self._receive(conn)
            except (psycopg.Error, VolfsError, OSError) as exc:
                if not lost:
                    log.warning("volume %s: change feed lost (%s); reconnecting",
                                self.model.name, schema.first_line(exc))  # fmt: skip
                lost = True
                self.connected = trio.Event()
                await trio.sleep(pause)
                pause = min(pause * 2, RECONNECT_MOST)
            finally:
                if conn is not None:
                    conn.close()

    def _listen(self) -> psycopg.Connection[Any]:
        conn = schema.connect(self.model.url, FEED_PURPOSE)
        try:
            conn.execute(f'LISTEN "{self.model.channel}"')
        except BaseException:
            conn.close()
            raise
        return conn

    async def _receive(self, conn: psycopg.Connection[Any]) -> None:
        pgconn = conn.pgconn
        while True:
            await trio.lowlevel.wait_readable(pgconn.socket)
            pgconn.consume_input()  # psycopg.OperationalError once the connection is gone
            if pgconn.status != psycopg.pq.ConnStatus.OK:
                raise OSError(errno.ECONNRESET, "the connection was closed")
            while (notice := pgconn.notifies()) is not None:
                self._handle(notice.extra.decode())

    def _handle(self, payload: str) -> None:
        session, _, rest = payload.partition(" ")
        if rest.startswith(BARRIER):  # a lock taken here waits until what came before is done
            if session == self.model.session:
                _, token, ino = rest.split()
                self._inodes.add(int(ino))
                self._barriers.append(int(token))
                self._wake.set()
            return
        if rest == EVERYTHING:
            if session != self.model.session:
                self._everything()
            return
        changes = json.loads(payload)
        if changes["s"] == self.model.session:
            return  # this host's own: its kernel saw it happen
        self.notices += 1
        if "l" in changes:  # locks released there: the requests waiting here try again
            self.model.wake(set(changes["l"]))
        self._inodes.update(changes["i"])
        self._entries.update((parent, bytes.fromhex(name)) for parent, name in changes["e"])
        self._wake.set()

    def _everything(self) -> None:
        self.model.wake(None)  # any lock may have been released meanwhile
        self._inodes.update(self.model.referenced())
        self._entries.update(self.model.names_seen())
        self._wake.set()

    async def _invalidating(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            inodes, self._inodes = self._inodes, set()
            entries, self._entries = self._entries, set()
            barriers, self._barriers = self._barriers, []
            await trio.to_thread.run_sync(self._invalidate, inodes, entries)
            for token in barriers:
                self.model.barrier_passed(token)

    def _invalidate(self, inodes: Iterable[int], entries: Iterable[tuple[int, bytes]]) -> None:
        known = self._known
        for parent, name in entries:
            if known(parent):  # the kernel can cache names only under these
                _ignoring_unknown(self._entry, parent, name)
        for ino in inodes:
            if known(ino):
                _ignoring_unknown(self._inode, ino)

    def _known(self, ino: int) -> bool:
        """Whether the kernel may cache inode *ino* here (the root: always)."""
        model = self.model
        return ino == ROOT_INO or model.count_of(ino, 0) > 0 or model.count_of(ino, 1) > 0


def _ignoring_unknown(call: Callable[..., None], *args: Any) -> None:
    """Make an invalidation: ENOENT (the kernel has forgotten it meanwhile) is no failure."""
    try:
        call(*args)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("invalidating %s failed: %s", args, exc)
