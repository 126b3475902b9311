"""The mount worker: one process that serves one volume at one mount point.

pyfuse3 keeps its session in process-global state, so each served volume needs a process of
its own; the CLI (and later the supervisor) starts this module as that process.  The worker
reports readiness on a pipe once the mount is live, so its starter can return only then.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import logging
import os
import signal
import sys
from pathlib import Path

import pyfuse3
import trio

from volfs import mounts
from volfs.errors import VolfsError
from volfs.fsops import VolumeOperations
from volfs.store.root import StoreRoot
from volfs.store.volume import Volume

log = logging.getLogger(__name__)

#: How often the worker checks whether a checkpoint is due.
HOUSEKEEPING_INTERVAL = 1.0
HOUSEKEEPING_RETRY = 30.0
#: Larger kernel read-ahead for the mount: reads otherwise arrive in 128 KiB pieces.
READ_AHEAD_KB = 1024


def mount_options(name: str, read_only: bool) -> set[str]:
    options = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    options |= {f"fsname={name}", "subtype=volfs"}
    if os.geteuid() == 0 or _user_allow_other():
        options.add("allow_other")  # containers run as other uids
    if read_only:
        options.add("ro")
    return options


def _user_allow_other() -> bool:
    try:
        with open("/etc/fuse.conf") as conf:
            return any(line.strip() == "user_allow_other" for line in conf)
    except OSError:
        return False


def _raise_read_ahead(mountpoint: Path) -> None:
    """Best effort: only root may write the mount's bdi settings.

    The device number comes from the mount table: a stat() of the mount point would wait for
    this very process to answer it.
    """
    entry = mounts.find_mount(mountpoint)
    if entry is None:
        return
    try:
        Path(f"/sys/class/bdi/{entry.device}/read_ahead_kb").write_text(str(READ_AHEAD_KB))
    except OSError as exc:
        log.debug("could not raise read-ahead of %s: %s", mountpoint, exc)


async def _housekeeping(volume: Volume, parent: int | None) -> None:
    """Compact and checkpoint between requests; a failure here is logged, never fatal.

    With *parent* set, also unmount once that process (the daemon) is gone.  (Not
    PR_SET_PDEATHSIG: it fires when the parent *thread* ends, and trio starts processes from
    worker threads that it retires after 10 idle seconds.)
    """
    while True:
        await trio.sleep(HOUSEKEEPING_INTERVAL)
        if parent is not None and os.getppid() != parent:
            log.info("volume %s: the daemon is gone; unmounting", volume.name)
            pyfuse3.terminate()
            return
        try:
            await _compact(volume)
            if volume.reclaim_due:
                volume.reclaim()
            elif volume.checkpoint_due:
                await _checkpoint(volume)
            volume.save_usage()
        except Exception:
            log.exception("volume %s: housekeeping failed; trying again later", volume.name)
            await trio.sleep(HOUSEKEEPING_RETRY)


async def _compact(volume: Volume) -> None:
    live: dict[int, list[tuple[int, int, int]]] = {}
    while (seg := volume.compaction_victim()) is not None:
        # Ranges from an earlier scan stay good for segments sealed by then: no data enters
        # a sealed segment, and `relocate` skips what has moved or gone since.  A segment
        # sealed since that scan (or met again) gets a new scan.
        if seg not in live:
            live = volume.live_ranges()
            del live[volume.log.head.seg]  # still growing: a later scan will have all of it
        ranges = live.pop(seg)
        log.info("volume %s: compacting segment %d (%d extents)", volume.name, seg, len(ranges))
        for ino, start, length in ranges:
            volume.relocate(ino, start, length, seg)
            await trio.sleep(0)  # let waiting requests in between pieces
        await _checkpoint(volume)  # the segment can go only once a checkpoint no longer needs it


async def _checkpoint(volume: Volume) -> None:
    """Checkpoint in a forked writer while requests go on being served, and wait for it."""
    pid = volume.fork_checkpoint()
    pidfd = os.pidfd_open(pid)
    try:
        # If the worker is stopping meanwhile, `Volume.close` waits for the writer instead.
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    # The volume reaps the writer (unless a request's checkpoint, on a full disk, already
    # did); a failure goes to housekeeping's retry delay instead of forking again at once.
    if not volume.wait_checkpoint():
        raise OSError(errno.EIO, f"checkpoint writer {pid} failed; see the log above")


async def _stop_on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


async def _serve(volume: Volume, parent: int | None) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_housekeeping, volume, parent)
        nursery.start_soon(_stop_on_signals)
        # One reading task: handlers never await, so a second task could not overlap with
        # the first; it would only cost a lock hand-off between the two on every request.
        await pyfuse3.main(min_tasks=1, max_tasks=1)
        nursery.cancel_scope.cancel()


def serve(
    root: Path,
    name: str,
    mountpoint: Path,
    read_only: bool,
    ready_fd: int | None,
    parent: int | None = None,
) -> None:
    """Serve volume *name* at *mountpoint* until it is unmounted, a signal arrives, or the
    process *parent* (if given) ends."""
    # Loading makes an object or more per file and no reference cycles: collections during
    # it would only cost (half the load time at 300k files), and scanning those long-lived
    # objects again at every later full collection would make each request dearer the larger
    # the volume.  So: no collector while loading, and what was loaded is frozen.
    gc.disable()
    try:
        volume = StoreRoot(root).open_volume(name)
    finally:
        gc.enable()
    gc.freeze()
    operations = VolumeOperations(volume, read_only=read_only)
    try:
        pyfuse3.init(operations, str(mountpoint), mount_options(name, read_only))
    except RuntimeError as exc:
        volume.close()
        raise VolfsError(f"cannot mount {name} at {mountpoint}: {exc}") from None
    clean = False
    try:
        _raise_read_ahead(mountpoint)
        log.info("volume %s mounted at %s (pid %d)", name, mountpoint, os.getpid())
        if ready_fd is not None:
            os.write(ready_fd, b"ok\n")
            os.close(ready_fd)
            ready_fd = None
        trio.run(_serve, volume, parent)
        clean = True
    finally:
        # The volume must close (checkpoint) whole: a late SIGTERM must not cut it short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # unmount=True detaches the mount if the kernel still has it (signal, error).
        pyfuse3.close(unmount=True)
        volume.close()
        log.info("volume %s at %s: %s", name, mountpoint, "unmounted" if clean else "stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m volfs.worker")
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--mountpoint", required=True, type=Path)
    parser.add_argument("--read-only", action="store_true")
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--die-with-parent", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        force=True,  # `volfsd mount -f` runs this in the CLI's process, which set up its own
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s volfsd[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    try:
        parent = os.getppid() if args.die_with_parent else None
        serve(args.root, args.name, args.mountpoint, args.read_only, args.ready_fd, parent)
    except VolfsError as exc:
        log.error("%s", exc)
        if args.ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(args.ready_fd, f"error: {exc}\n".encode())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
