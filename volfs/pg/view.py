"""One step's view of a PostgreSQL volume: its inodes as rows, read and changed inside the
step's transaction (`volfs.pg.model.PgModel.run` runs it).

A view lives for one attempt of one step.  It hands out a `PgNode` per inode, one object per
inode number for the attempt (the rules compare nodes by identity: a rename onto another link
of the same inode), with the row's attributes as they were read and as the step changed them.
What the step changes it also notes for the change feed: inode numbers, and (parent, name) of
entries, sent with the commit (`changes`).

A node's ``lookups`` and ``opens`` are not volume state but this process's references: they
live in the model (by inode number), so a node from any step shows the same counts.  What a
step changes of them is noted and given back if the attempt is run again (`undo_counts`).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import psycopg
from pyfuse3 import FUSEError, LockRange

from volfs.errors import NoSpace
from volfs.pg import blocks, locks
from volfs.pg.schema import ROOT_INO
from volfs.store.dirents import Listing

if TYPE_CHECKING:
    from volfs.pg.model import PgModel

# An inode's attributes come with the row only if it has some (``nxattrs``): reading the
# empty arrays of the others cost twice the row itself.
_COLUMNS = (
    "i.ino, i.mode, i.uid, i.gid, i.rdev, i.size, i.stored, i.atime_ns, i.mtime_ns, i.ctime_ns,"
    " i.nlink, i.target, i.parent, i.nxattrs,"
    " CASE WHEN i.nxattrs > 0 THEN ARRAY(SELECT x.name FROM xattrs x WHERE x.volume = i.volume"
    " AND x.ino = i.ino ORDER BY x.name) END,"
    " CASE WHEN i.nxattrs > 0 THEN ARRAY(SELECT x.value FROM xattrs x WHERE x.volume = i.volume"
    " AND x.ino = i.ino ORDER BY x.name) END"
)
_ATTRS = ("mode", "uid", "gid", "size", "atime_ns", "mtime_ns", "ctime_ns")
#: What statfs shows as the capacity of a volume without a size: the database's disk is not
#: this process's to measure.
NOMINAL_BYTES = 1 << 50
NOMINAL_INODES = 1 << 32
_FRSIZE = 4096
PREFETCH = 64  #: inodes a listing reads per query


class PgNode:
    """An inode as one step sees it (`volfs.model.Node`)."""

    __slots__ = ("_view", "atime_ns", "ctime_ns", "gid", "ino", "mode", "mtime_ns", "nlink",
                 "nxattrs", "parent", "rdev", "size", "stored", "target", "uid",
                 "xattrs")  # fmt: skip

    def __init__(self, view: _RowsView, row: tuple[Any, ...] | None = None) -> None:
        self._view = view
        self.xattrs: dict[bytes, bytes] | None = None
        self.target: bytes | None = None
        if row is not None:
            (self.ino, self.mode, self.uid, self.gid, self.rdev, self.size, self.stored,
             self.atime_ns, self.mtime_ns, self.ctime_ns, self.nlink, target, self.parent,
             self.nxattrs, names, values) = row  # fmt: skip
            self.target = None if target is None else bytes(target)
            if names:
                self.xattrs = {bytes(n): bytes(v) for n, v in zip(names, values, strict=True)}

    @property
    def lookups(self) -> int:
        return self._view.model.count_of(self.ino, 0)

    @lookups.setter
    def lookups(self, value: int) -> None:
        self._view.count(self.ino, 0, value - self.lookups)

    @property
    def opens(self) -> int:
        return self._view.model.count_of(self.ino, 1)

    @opens.setter
    def opens(self, value: int) -> None:
        self._view.count(self.ino, 1, value - self.opens)


class PgListing(Listing):
    """A listing that reads the inodes of the next `PREFETCH` names in one query (readdir
    asks for each entry's attributes), through the step's view (`PgModel.current_view`)."""

    __slots__ = ("_model",)

    def __init__(self, entries: dict[bytes, int], model: PgModel) -> None:
        super().__init__(entries)
        self._model = model

    def after(self, offset: int) -> Iterator[tuple[bytes, int, int]]:
        """As `Listing.after`, less the entries whose inode another host has removed since
        the listing began (as the local listing skips entries removed meanwhile)."""
        view = self._model.current_view()
        batch: list[tuple[bytes, int, int]] = []
        for item in super().after(offset):
            batch.append(item)
            if len(batch) == PREFETCH:
                yield from self._present(view, batch)
                batch = []
        yield from self._present(view, batch)

    @staticmethod
    def _present(
        view: _RowsView | None, batch: list[tuple[bytes, int, int]]
    ) -> list[tuple[bytes, int, int]]:
        if view is None or not batch:
            return batch
        found = view.prefetch([ino for _, ino, _ in batch])
        return [item for item in batch if item[1] in found]


class _RowsView:
    """What `PgView` builds on: nodes from rows, the lookups, the figures, the references,
    and saving a node's columns."""

    def __init__(self, model: PgModel, conn: psycopg.Connection[Any]) -> None:
        self.model = model
        self.name = model.name
        self.vid = model.vid
        self.conn = conn
        self.active = True  #: False once the attempt is over: later count changes stand
        self._nodes: dict[int, PgNode] = {}
        self.changed_inodes: set[int] = set()
        self.changed_entries: set[tuple[int, bytes]] = set()
        self._counted: list[tuple[int, int, int]] = []  #: (ino, which, delta) this attempt
        self.after_commit: list[Callable[[], None]] = []
        self.unlocked: set[int] = set()  #: inodes where this step released locks
        #: Whether this step wrote rows of its own besides the changes above (locks taken).
        self.wrote_rows = False
        self._limits: tuple[int, int, int, int] | None = None  #: quota, inode limit, used, inodes
        self._used = self._inodes = 0  #: what this attempt adds to the volume's figures
        self.synced = False  #: whether the attempt commits synchronously (`sync`)

    # -- the references this process holds ------------------------------------------------

    def count(self, ino: int, which: int, delta: int) -> None:
        """Change this process's lookups (*which* 0) or opens (1) of inode *ino*."""
        self.model.add_count(ino, which, delta)
        if self.active:
            self._counted.append((ino, which, delta))

    def undo_counts(self) -> None:
        """Give back what this attempt changed of the references (it is run again)."""
        for ino, which, delta in reversed(self._counted):
            self.model.add_count(ino, which, -delta)
        self._counted.clear()

    # -- lookups --------------------------------------------------------------------------

    def _node(self, row: tuple[Any, ...] | None) -> PgNode | None:
        if row is None:
            return None
        node = self._nodes.get(row[0])
        if node is None:
            node = self._nodes[row[0]] = PgNode(self, row)
        return node

    def inode(self, ino: int) -> PgNode | None:
        node = self._nodes.get(ino)
        if node is not None:
            return node
        return self._node(self.conn.execute(
            f"SELECT {_COLUMNS} FROM inodes i WHERE i.volume = %s AND i.ino = %s", (self.vid, ino)
        ).fetchone())  # fmt: skip

    def child(self, directory: PgNode, name: bytes) -> PgNode | None:
        self.model.looked_up(directory.ino, name)
        return self._node(self.conn.execute(
            f"SELECT {_COLUMNS} FROM entries e JOIN inodes i ON i.volume = e.volume AND"
            " i.ino = e.ino WHERE e.volume = %s AND e.parent = %s AND e.name = %s",
            (self.vid, directory.ino, name),
        ).fetchone())  # fmt: skip

    def entry_count(self, directory: PgNode) -> int:
        row = self.conn.execute(
            "SELECT count(*) FROM entries WHERE volume = %s AND parent = %s",
            (self.vid, directory.ino),
        ).fetchone()
        return int(row[0]) if row else 0

    def listing(self, directory: PgNode) -> PgListing:
        """The names of *directory* now: the handle lists them as they were at opendir."""
        rows = self.conn.execute(
            "SELECT name, ino FROM entries WHERE volume = %s AND parent = %s ORDER BY name",
            (self.vid, directory.ino),
        ).fetchall()
        return PgListing({bytes(name): ino for name, ino in rows}, self.model)

    def prefetch(self, inos: list[int]) -> set[int]:
        """Read the rows of *inos* in one query, for the lookups that follow; which exist."""
        missing = [ino for ino in inos if ino not in self._nodes]
        if missing:
            for row in self.conn.execute(
                f"SELECT {_COLUMNS} FROM inodes i WHERE i.volume = %s AND i.ino = ANY(%s)",
                (self.vid, missing),
            ).fetchall():
                self._node(row)
        return {ino for ino in inos if ino in self._nodes}

    # -- figures --------------------------------------------------------------------------

    def _figures(self) -> tuple[int, int, int, int]:
        if self._limits is None:
            row = self.conn.execute(
                "SELECT quota, inode_limit, used, inodes FROM volumes WHERE id = %s", (self.vid,)
            ).fetchone()
            if row is None:
                raise OSError(errno.EIO, f"volume {self.name} is gone from the engine")
            self._limits = row
        return self._limits

    @property
    def quota(self) -> int:
        return self._figures()[0]

    @property
    def inode_limit(self) -> int:
        return self._figures()[1]

    @property
    def used_by_files(self) -> int:
        return self._figures()[2] + self._used

    @property
    def inodes_used(self) -> int:
        return self._figures()[3] + self._inodes

    def disk_stats(self) -> os.statvfs_result:
        """Nominal figures (`NOMINAL_BYTES`, `NOMINAL_INODES`) less what the volume holds."""
        blocks_ = NOMINAL_BYTES // _FRSIZE
        free = max(0, blocks_ - -(-self.used_by_files // _FRSIZE))
        inodes = max(0, NOMINAL_INODES - self.inodes_used)
        return os.statvfs_result((_FRSIZE, _FRSIZE, blocks_, free, free, NOMINAL_INODES, inodes,
                                  inodes, 0, 255))  # fmt: skip

    def _charge(self, node: PgNode, stored: int, inodes: int = 0) -> None:
        """Count *stored* bytes more for *node* (and *inodes* more inodes), refused with
        `NoSpace` past the volume's size or inode limit before anything changes."""
        if stored > 0 or inodes > 0:
            quota, limit, used, count = self._figures()
            if stored > 0 and quota and used + self._used + stored > quota:
                raise NoSpace(errno.ENOSPC, f"volume {self.name} is full")
            if inodes > 0 and limit and count + self._inodes + inodes > limit:
                raise NoSpace(errno.ENOSPC, f"volume {self.name} has no free inodes")
        self._used += stored
        self._inodes += inodes
        node.stored += stored

    @property
    def wrote(self) -> bool:
        """Whether this attempt changed a row."""
        return bool(self.changed_inodes or self.changed_entries or self.after_commit
                    or self._used or self._inodes or self.synced or self.unlocked
                    or self.wrote_rows)  # fmt: skip

    def finish(self) -> None:
        """The step is done: write the volume's figures (one row, only if they changed)."""
        if self._used or self._inodes:
            self.conn.execute("UPDATE volumes SET used = used + %s, inodes = inodes + %s"
                              " WHERE id = %s", (self._used, self._inodes, self.vid))  # fmt: skip

    # -- saving ---------------------------------------------------------------------------

    def _save(self, node: PgNode, *columns: str) -> None:
        sets = ", ".join(f"{c} = %s" for c in columns)
        self.conn.execute(f"UPDATE inodes SET {sets} WHERE volume = %s AND ino = %s",
                          (*(getattr(node, c) for c in columns), self.vid, node.ino))  # fmt: skip
        self.changed_inodes.add(node.ino)

    def _touch(self, node: PgNode, now_ns: int, mtime: bool = True, *more: str) -> None:
        node.ctime_ns = now_ns
        if mtime:
            node.mtime_ns = now_ns
        self._save(node, "ctime_ns", *(("mtime_ns",) if mtime else ()), *more)

    def _current(self, inode: PgNode) -> PgNode:
        """*inode* as this step reads it: a node from an earlier step (an open handle's) is
        read anew, and what is read is copied into it for the caller."""
        node = self._refreshed(inode)
        if node is None:
            raise OSError(errno.ESTALE, f"inode {inode.ino} is gone (removed by another host)")
        return node

    def _refreshed(self, inode: PgNode) -> PgNode | None:
        if self._nodes.get(inode.ino) is inode:
            return inode
        fresh = self.inode(inode.ino)
        if fresh is None:
            return None
        for attr in (*_ATTRS, "stored", "nlink", "xattrs", "nxattrs", "parent"):
            setattr(inode, attr, getattr(fresh, attr))
        self._nodes[inode.ino] = inode
        return inode


class PgView(_RowsView):
    """`volfs.model.VolumeView` of one attempt of one step, on the step's connection."""

    # -- changes --------------------------------------------------------------------------

    def new_inode(self, mode: int, uid: int, gid: int, rdev: int, now_ns: int) -> PgNode:
        row = self.conn.execute("SELECT nextval('inode_numbers')").fetchone()
        assert row is not None
        node = PgNode(self)
        node.ino, node.mode, node.uid, node.gid, node.rdev = int(row[0]), mode, uid, gid, rdev
        node.size = node.stored = node.parent = node.nxattrs = 0
        node.atime_ns = node.mtime_ns = node.ctime_ns = now_ns
        node.nlink = 1 if stat.S_ISDIR(mode) else 0
        return node

    @staticmethod
    def _alive(directory: PgNode) -> None:
        """Refuse a new name in a directory another host removed (ENOENT, as Linux answers
        for a removed directory; its kernel would have refused it on that host itself): the
        directory's inode stays while this host's kernel holds it, but takes no entries."""
        if directory.nlink == 0:
            raise FUSEError(errno.ENOENT)

    def create(self, parent: PgNode, name: bytes, inode: PgNode, now_ns: int) -> None:
        self._alive(parent)
        self._charge(inode, 0, inodes=1)
        inode.parent = parent.ino
        self.conn.execute(
            "INSERT INTO inodes VALUES (%s, %s, %s, %s, %s, %s, %s, 0, %s, %s, %s, %s, %s, %s)",
            (self.vid, inode.ino, inode.mode, inode.uid, inode.gid, inode.rdev, inode.size,
             inode.atime_ns, inode.mtime_ns, inode.ctime_ns, inode.nlink, inode.target,
             inode.parent),
        )  # fmt: skip
        self._nodes[inode.ino] = inode
        self.link(inode, parent, name, now_ns, touch_inode=False)

    def link(self, inode: PgNode, parent: PgNode, name: bytes, now_ns: int,
             touch_inode: bool = True) -> None:  # fmt: skip
        self._alive(parent)
        self.conn.execute("INSERT INTO entries VALUES (%s, %s, %s, %s)",
                          (self.vid, parent.ino, name, inode.ino))  # fmt: skip
        self.changed_entries.add((parent.ino, name))
        inode.nlink += 1
        if touch_inode:
            self._touch(inode, now_ns, False, "nlink")
        else:
            self._save(inode, "nlink")
        if stat.S_ISDIR(inode.mode):
            parent.nlink += 1
            self._touch(parent, now_ns, True, "nlink")
        else:
            self._touch(parent, now_ns)

    def _unlinked(self, parent: PgNode, child: PgNode, now_ns: int) -> None:
        """Count *child*'s link from *parent* as gone (a directory's is its only one)."""
        if stat.S_ISDIR(child.mode):
            parent.nlink -= 1
            child.nlink = 0
            self._save(child, "nlink")
        else:
            child.nlink -= 1
            self._touch(child, now_ns, False, "nlink")

    def unlink(self, parent: PgNode, name: bytes, child: PgNode, now_ns: int) -> None:
        self.conn.execute("DELETE FROM entries WHERE volume = %s AND parent = %s AND name = %s",
                          (self.vid, parent.ino, name))  # fmt: skip
        self.changed_entries.add((parent.ino, name))
        self._unlinked(parent, child, now_ns)
        self._touch(parent, now_ns, True, "nlink")
        self.forget(child)

    def rename(self, old_parent: PgNode, old_name: bytes, new_parent: PgNode, new_name: bytes,
               replaced: PgNode | None, now_ns: int) -> None:  # fmt: skip
        self._alive(new_parent)
        moved = self.child(old_parent, old_name)
        assert moved is not None
        if replaced is not None:
            self.conn.execute("DELETE FROM entries WHERE volume = %s AND parent = %s AND"
                              " name = %s", (self.vid, new_parent.ino, new_name))  # fmt: skip
            self._unlinked(new_parent, replaced, now_ns)
        self.conn.execute(
            "UPDATE entries SET parent = %s, name = %s WHERE volume = %s AND parent = %s AND"
            " name = %s",
            (new_parent.ino, new_name, self.vid, old_parent.ino, old_name),
        )
        self.changed_entries.update(((old_parent.ino, old_name), (new_parent.ino, new_name)))
        self._moved(moved, old_parent, new_parent, now_ns)
        if replaced is not None:
            self.forget(replaced)

    def _moved(self, moved: PgNode, old_parent: PgNode, new_parent: PgNode, now_ns: int) -> None:
        if stat.S_ISDIR(moved.mode) and old_parent is not new_parent:
            old_parent.nlink -= 1
            new_parent.nlink += 1
            moved.parent = new_parent.ino
            self._touch(moved, now_ns, False, "parent")
        else:
            self._touch(moved, now_ns, False)
        for parent in {id(p): p for p in (old_parent, new_parent)}.values():
            self._touch(parent, now_ns, True, "nlink")

    def exchange(self, parent_a: PgNode, name_a: bytes, parent_b: PgNode, name_b: bytes,
                 now_ns: int) -> None:  # fmt: skip
        a, b = self.child(parent_a, name_a), self.child(parent_b, name_b)
        assert a is not None and b is not None
        for parent, name, node in ((parent_a, name_a, b), (parent_b, name_b, a)):
            self.conn.execute("UPDATE entries SET ino = %s WHERE volume = %s AND parent = %s"
                              " AND name = %s", (node.ino, self.vid, parent.ino, name))  # fmt: skip
            self.changed_entries.add((parent.ino, name))
        self._moved(a, parent_a, parent_b, now_ns)
        self._moved(b, parent_b, parent_a, now_ns)

    def set_attrs(self, inode: PgNode, *, mode: int | None = None, uid: int | None = None,
                  gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                  mtime_ns: int | None = None, ctime_ns: int) -> None:  # fmt: skip
        if size is not None and size < inode.size:
            self._charge(inode, blocks.cut(self.conn, self.vid, inode.ino, size, 1 << 62))
        values = (mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns)
        for attr, value in zip(_ATTRS, values, strict=True):
            if value is not None:
                setattr(inode, attr, value)
        self._save(inode, *_ATTRS, "stored")

    def set_xattr(self, inode: PgNode, name: bytes, value: bytes | None, now_ns: int) -> None:
        had = inode.xattrs is not None and name in inode.xattrs
        inode.nxattrs += (value is not None) - had
        if value is None:
            self.conn.execute("DELETE FROM xattrs WHERE volume = %s AND ino = %s AND name = %s",
                              (self.vid, inode.ino, name))  # fmt: skip
            if inode.xattrs is not None:
                inode.xattrs.pop(name, None)
        else:
            self.conn.execute(
                "INSERT INTO xattrs VALUES (%s, %s, %s, %s) ON CONFLICT (volume, ino, name)"
                " DO UPDATE SET value = excluded.value",
                (self.vid, inode.ino, name, value),
            )
            inode.xattrs = {**(inode.xattrs or {}), name: value}
        self._touch(inode, now_ns, False, "nxattrs")

    # -- data -----------------------------------------------------------------------------

    def write(self, inode: PgNode, offset: int, data: bytes, now_ns: int) -> None:
        node = self._current(inode)
        if not data:
            return
        self._data_change(node, blocks.write(self.conn, self.vid, node.ino, offset, data),
                          offset + len(data), now_ns)  # fmt: skip

    def _data_change(self, node: PgNode, stored: int, end: int | None, now_ns: int) -> None:
        try:
            self._charge(node, stored)
        except NoSpace:
            raise  # the transaction is rolled back: the rows just written go with it
        if end is not None and end > node.size:
            node.size = end
        node.mtime_ns = node.ctime_ns = now_ns
        self._save(node, "size", "stored", "mtime_ns", "ctime_ns")

    def fallocate(self, inode: PgNode, offset: int, length: int, now_ns: int, *,
                  keep_size: bool = False, punch: bool = False) -> None:  # fmt: skip
        node = self._current(inode)
        if punch:
            end = min(offset + length, node.size)
            stored = blocks.cut(self.conn, self.vid, node.ino, offset, end)
            self._data_change(node, stored, None, now_ns)
            return
        stored = blocks.write(self.conn, self.vid, node.ino, offset, bytes(length), keep=True)
        self._data_change(node, stored, None if keep_size else offset + length, now_ns)

    def has_xattr(self, name: bytes) -> bool:
        """True: another host may set any attribute at any time (security.capability too),
        so this process can never answer for the volume that none has it."""
        return True

    def read(self, inode: PgNode, offset: int, size: int) -> bytes:
        node = self._current(inode)
        end = min(offset + size, node.size)
        return blocks.read(self.conn, self.name, self.vid, node.ino, offset, end)

    def seek(self, inode: PgNode, offset: int, hole: bool) -> int | None:
        node = self._current(inode)
        return blocks.seek(self.conn, self.vid, node.ino, node.size, offset, hole)

    def forget(self, inode: PgNode) -> None:
        """Let go of an unlinked inode once no process on any host reaches it: this host's
        hold on it goes when nothing here has it open; its rows go when no host holds it."""
        model, ino = self.model, inode.ino
        node = self._refreshed(inode)
        if node is None:  # freed by another host meanwhile (its hold rows with it)
            self.after_commit.append(lambda: model.held.discard(ino))
            return
        if inode.opens <= 0 and ino in model.held:
            self.conn.execute(
                "DELETE FROM holds WHERE volume = %s AND ino = %s AND session = %s",
                (self.vid, ino, model.session),
            )
            self.after_commit.append(lambda: model.held.discard(ino))
        if inode.nlink or inode.opens > 0 or inode.lookups > 0 or ino == ROOT_INO:
            return
        other = self.conn.execute(
            "SELECT 1 FROM holds WHERE volume = %s AND ino = %s AND session <> %s LIMIT 1",
            (self.vid, ino, model.session),
        ).fetchone()
        if other is None:
            self.free(inode)

    def free(self, inode: PgNode) -> None:
        """Remove an inode no entry names and nothing holds, with its data."""
        self.conn.execute("DELETE FROM inodes WHERE volume = %s AND ino = %s",
                          (self.vid, inode.ino))  # fmt: skip
        self._used -= inode.stored
        self._inodes -= 1
        self.changed_inodes.add(inode.ino)

    def hold(self, inode: PgNode) -> PgNode:
        """This process is about to open *inode*: hold it (a row in ``holds``) so that no
        other host frees it while it is open here."""
        model, ino = self.model, inode.ino
        if ino not in model.held or inode.opens <= 0:
            self.conn.execute("INSERT INTO holds VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                              (self.vid, ino, model.session))  # fmt: skip
            self.after_commit.append(lambda: model.held.add(ino))
        return inode

    def sync(self) -> None:
        """Commit this step synchronously: its commit record's flush makes every commit
        before it durable too (the WAL is one sequence).  The step must write a row for
        that (a transaction that wrote nothing commits without a flush): its session's,
        which no other host's transactions touch."""
        self.synced = True
        self.conn.execute("SET LOCAL synchronous_commit TO on")
        self.conn.execute("UPDATE sessions SET synced = now() WHERE id = %s",
                          (self.model.session,))  # fmt: skip

    # -- locks (volfs.pg.locks) -----------------------------------------------------------

    def lock(self, inode: PgNode, owner: int, flock: bool, lock: LockRange) -> bool:
        return locks.take(self, inode.ino, owner, flock, lock)

    def test_lock(self, inode: PgNode, owner: int, lock: LockRange) -> LockRange:
        return locks.conflicting(self, inode.ino, owner, lock)

    def unlock_owner(self, inode: PgNode, owner: int) -> bool:
        return locks.release(self, inode.ino, owner)
