"""Noticing the paths of served volumes that were unmounted behind the daemon's back.

A user's ``umount DIR`` (umount(8) calls umount2() itself for a ``fuse.volfs`` mount: there
is no ``umount.fuse.volfs`` helper it would call), ``umount -l``, or umount2() from any other
program, take a bind away without a word to the daemon.  Such a path is the user's unmount:
the supervisor forgets it, so that neither a heal nor the next daemon brings it back.

The kernel marks ``/proc/self/mountinfo`` with POLLPRI (and POLLERR) whenever this mount
namespace's table changes.  trio waits only for readability, and that file always reads, so
the descriptor goes into an epoll set of its own that asks for POLLPRI alone: the set's
descriptor becomes readable once per change (a poll clears the mark).  An idle daemon on a
quiet host wakes only for the check every `RECHECK_EVERY` seconds (and reads the table only
while it serves a path); each change of the host's mounts costs one read of the table (about
0.2 ms for 25 mounts here).
"""

from __future__ import annotations

import logging
import os
import select
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import trio

from volfs import mounts
from volfs.served import DEAD, MOUNTED, Served

log = logging.getLogger(__name__)

MOUNTINFO = "/proc/self/mountinfo"
#: Seconds between checks while no change is signalled.  The POLLPRI mark alone was seen to
#: miss a change on a loaded machine (of two paths unmounted by one umount(8), the second; the
#: cause is not known), so the table is also read this often: 0.2 ms per read.
RECHECK_EVERY = 2.0


async def watch_mount_table(lock: trio.Lock, on_change: Callable[[], None]) -> None:
    """Call *on_change*, holding *lock*, once now and then after each change of this
    process's mount table (and every `RECHECK_EVERY` seconds), until cancelled.  Changes that
    come while it waits for the lock or runs are coalesced into one more call."""
    try:
        fd = os.open(MOUNTINFO, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:  # no /proc: the daemon serves on, blind to unmounts by others
        log.error("cannot watch the mount table (%s): a path unmounted by umount(8) stays "
                  "the daemon's until `volfsd umount PATH`", exc)  # fmt: skip
        return
    changes = select.epoll()
    try:
        changes.register(fd, select.EPOLLPRI)
        while True:
            # A change after the open is marked until the next poll, so one that comes while
            # on_change reads the table wakes the wait below: none is missed.
            async with lock:
                try:
                    on_change()
                except OSError as exc:  # (the remembered mounts' file) not the daemon's end
                    log.error("after a change of the mount table: %s", exc)
            with trio.move_on_after(RECHECK_EVERY):
                await trio.lowlevel.wait_readable(changes.fileno())
            changes.poll(0)  # clears the mark (trio's own check of the set may have already)
    finally:
        changes.close()
        os.close(fd)


def unmounted_paths(
    served: Iterable[Served], table: list[mounts.MountEntry], bind: bool
) -> Iterator[tuple[Served, Path]]:
    """The paths of *served* volumes that hold no volfs mount of their volume in *table*.

    A path counts only while the daemon says it is there: MOUNTED, or, with bind mounts,
    DEAD (a healing volume's dead bind stays in the table, of the volume's name, until its
    replacement is in; a dead bind taken away meanwhile is the user's unmount as well).
    Without bind mounts a heal detaches the dead mount itself first, so DEAD paths are left
    alone then.  Staging mounts are no path of a volume, and refused paths are not mounted.
    """
    present = {(e.mountpoint, e.source) for e in table if e.fstype == mounts.FSTYPE}
    states = (MOUNTED, DEAD) if bind else (MOUNTED,)
    for volume in served:
        if volume.stopping:
            continue
        for path, mount_path in volume.paths.items():
            if mount_path.state in states and (str(path), volume.name) not in present:
                yield volume, path
