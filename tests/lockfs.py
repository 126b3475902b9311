"""A small pyfuse3 file system that keeps POSIX and flock locks itself, for the lock patch's
tests (tests/test_pyfuse3_patches.py): pyfuse3 patch 0005 is what lets it, and volfs does
not use it yet (the multi-host issue will).

    python lockfs.py MOUNTPOINT        prints "ready" once mounted; serves until unmounted

The root holds ``f``, an empty file to lock, and ``locks``, which reads as the lock table, one
line per lock or waiter (``posix OWNER TYPE START LENGTH``, ``flock OWNER OP``, ``waiting
OWNER``), so a test sees that the requests reached the file system.  One reading task, as
volfs runs (`main(max_tasks=1)`): a waiting F_SETLKW must not stop it serving.
"""

from __future__ import annotations

import errno
import fcntl
import stat
import sys

import pyfuse3
import trio

F_INO, LOCKS_INO = pyfuse3.ROOT_INODE + 1, pyfuse3.ROOT_INODE + 2
NAMES = {b"f": F_INO, b"locks": LOCKS_INO}


class LockFs(pyfuse3.Operations):
    enable_capabilities = pyfuse3.FUSE_CAP_POSIX_LOCKS | pyfuse3.FUSE_CAP_FLOCK_LOCKS

    def __init__(self) -> None:
        super().__init__()
        #: (owner, type, start, end or -1, pid)
        self.posix: list[tuple[int, int, int, int, int]] = []
        self.flocks: dict[int, int] = {}  # owner -> LOCK_SH or LOCK_EX
        self.waiting: list[int] = []
        self.changed = trio.Event()
        self.next_fh = 1

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    # -- the two files ----------------------------------------------------------------------

    def _table(self) -> bytes:
        lines = [f"posix {o} {t} {s} {e - s if e >= 0 else 0}" for o, t, s, e, _ in self.posix]
        lines += [f"flock {o} {op}" for o, op in self.flocks.items()]
        lines += [f"waiting {o}" for o in self.waiting]
        return "".join(line + "\n" for line in lines).encode()

    async def getattr(self, inode, ctx=None):
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.attr_timeout = entry.entry_timeout = 0
        if inode == pyfuse3.ROOT_INODE:
            entry.st_mode, entry.st_nlink = stat.S_IFDIR | 0o755, 2
        elif inode in (F_INO, LOCKS_INO):
            entry.st_mode, entry.st_size = stat.S_IFREG | 0o666, 0
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    async def lookup(self, parent_inode, name, ctx):
        if parent_inode != pyfuse3.ROOT_INODE or name not in NAMES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(NAMES[name])

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        for i, (name, ino) in enumerate(NAMES.items(), 1):
            if i > start_id and not pyfuse3.readdir_reply(token, name, await self.getattr(ino), i):
                break

    async def open(self, inode, flags, ctx):
        self.next_fh += 1
        return pyfuse3.FileInfo(fh=self.next_fh * 4 + inode % 4, direct_io=True)

    async def read(self, fh, off, size):
        return self._table()[off : off + size] if fh % 4 == LOCKS_INO % 4 else b""

    async def release(self, fh):
        pass

    # -- locks --------------------------------------------------------------------------------

    def _posix_conflict(self, owner: int, lock: pyfuse3.LockRange):
        end = lock.start + lock.length if lock.length else -1
        for held in self.posix:
            o, t, s, e, _ = held
            overlaps = (end < 0 or s < end) and (e < 0 or lock.start < e)
            if o != owner and overlaps and fcntl.F_WRLCK in (t, lock.type):
                return held
        return None

    async def getlk(self, fh, owner, lock):
        found = self._posix_conflict(owner, lock)
        if found is None:
            return lock._replace(type=fcntl.F_UNLCK)
        _, t, s, e, pid = found
        return pyfuse3.LockRange(t, s, e - s if e >= 0 else 0, pid)

    async def setlk(self, fh, owner, lock, sleep):
        end = lock.start + lock.length if lock.length else -1
        self.posix = [p for p in self.posix if p[0] != owner]  # whole ranges: enough here
        if lock.type != fcntl.F_UNLCK:
            await self._wait(owner, sleep, lambda: self._posix_conflict(owner, lock) is None)
            self.posix.append((owner, lock.type, lock.start, end, lock.pid))
        self._changed()

    async def flock(self, fh, owner, op):
        kind = op & ~fcntl.LOCK_NB
        self.flocks.pop(owner, None)
        if kind != fcntl.LOCK_UN:

            def free() -> bool:
                others = [k for o, k in self.flocks.items() if o != owner]
                return not others or (kind == fcntl.LOCK_SH and fcntl.LOCK_EX not in others)

            await self._wait(owner, not op & fcntl.LOCK_NB, free)
            self.flocks[owner] = kind
        self._changed()

    async def _wait(self, owner, sleep, free) -> None:
        while not free():
            if not sleep:
                raise pyfuse3.FUSEError(errno.EAGAIN)
            self.waiting.append(owner)
            try:
                await self.changed.wait()
            finally:  # also when the kernel interrupts the request (trio.Cancelled)
                self.waiting.remove(owner)

    async def release_locks(self, fh, owner):
        if fh % 4 != F_INO % 4:
            return  # a close drops its owner's locks on that file only
        self.posix = [p for p in self.posix if p[0] != owner]
        self.flocks.pop(owner, None)
        self._changed()


def main() -> None:
    mountpoint = sys.argv[1]
    options = set(pyfuse3.default_options) | {"fsname=lockfs"}
    pyfuse3.init(LockFs(), mountpoint, options)
    print("ready", flush=True)
    try:
        trio.run(pyfuse3.main, 1, 1)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
