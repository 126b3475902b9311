"""The mount worker: one process that serves one volume at one mount point.

pyfuse3 keeps its session in process-global state, so each served volume needs a process of
its own; the daemon (or `volfsd mount -f`) starts this module as that process.  The worker
reports readiness (and its mount's device number) on a pipe once the mount is live, so its
starter can return only then.  A worker started by the daemon does not end with it: it serves
until its mount goes away or it gets a signal, and answers on a control socket in the daemon's
runtime dir so that the next daemon can adopt it (workerctl.py).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyfuse3
import trio

from volfs import __version__, logs, mounts, pyfuse3_build, requests, workerctl
from volfs.errors import ErrorCode, StoreError, VolfsError
from volfs.fsops import VolumeOperations
from volfs.localmodel import LocalModel
from volfs.model import VolumeView
from volfs.opstats import OpStats
from volfs.store import checkpoints, history, snapshots
from volfs.store.readonly import ReadOnlyState
from volfs.store.root import StoreRoot
from volfs.store.volume import Volume

if TYPE_CHECKING:
    from volfs.pg.model import PgModel

# Not __name__: run as `python -m volfs.worker`, that is "__main__", which names no module.
log = logging.getLogger("volfs.worker")

#: How often the worker checks whether a checkpoint is due.
HOUSEKEEPING_INTERVAL = 1.0
HOUSEKEEPING_RETRY = 30.0
#: Larger kernel read-ahead for the mount: reads otherwise arrive in 128 KiB pieces.
READ_AHEAD_KB = 1024
#: pyfuse3 tasks reading requests for a volume of an engine: its handlers wait on the
#: database, so others are served meanwhile (more than its connections, which queue them).
ENGINE_TASKS = 8


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


def _raise_read_ahead(device: str) -> None:
    """Best effort: only root may write the mount's bdi settings.

    The device number comes from the mount table: a stat() of the mount point would wait for
    this very process to answer it.
    """
    if not device:
        return
    try:
        Path(f"/sys/class/bdi/{device}/read_ahead_kb").write_text(str(READ_AHEAD_KB))
    except OSError as exc:
        log.debug("could not raise read-ahead of %s: %s", device, exc)


async def _housekeeping(volume: Volume) -> None:
    """Compact and checkpoint between requests; a failure here is logged, never fatal."""
    while True:
        await trio.sleep(HOUSEKEEPING_INTERVAL)
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


def _answer(
    served: _Opened | _FromEngine, status: dict[str, object], stats: OpStats
) -> Callable[[requests.WorkerRequest], Awaitable[dict[str, object]]]:
    """The worker's answers to its control requests (a snapshot or a volume of an engine it
    serves only answers status and stats)."""
    volume = served.volume

    async def answer(request: requests.WorkerRequest) -> dict[str, object]:
        if isinstance(request, requests.WorkerStatusRequest):
            # The session's capabilities are known once the kernel's INIT has been handled.
            return {**status, "fuse_capabilities": pyfuse3_build.granted()}
        if isinstance(request, requests.WorkerStatsRequest):
            if isinstance(served, _FromEngine):  # the figures are rows: a step reads them
                return {**stats.snapshot(), **await served.figures()}
            return {**stats.snapshot(), **_figures(served)}
        if volume is None:
            what = "a snapshot" if isinstance(served, _Opened) else "served from an engine"
            raise VolfsError(f"{status['name']} is {what}: this worker cannot change it",
                             ErrorCode.INVALID)  # fmt: skip
        match request:
            case requests.SetLimitsRequest(size=size, inodes=inodes):
                volume.set_limits(size, volume.inode_limit if inodes is None else inodes)
                return {"size": volume.quota, "inodes": volume.inode_limit}
            case requests.TakeSnapshotRequest(snapshot=snap):
                # Between two requests: the loop runs no handler until this returns.
                try:
                    header = await _take_snapshot(volume, snap)
                    # Its ``live`` map has integer keys, which the control protocol's maps
                    # cannot carry, and the daemon describes the snapshot itself.
                    return {k: v for k, v in header.items() if k != "live"}
                except OSError as exc:
                    code = ErrorCode.NO_SPACE if exc.errno == errno.ENOSPC else ErrorCode.STORE
                    raise StoreError(f"cannot snapshot {volume.name}: {exc.strerror}",
                                     code) from None  # fmt: skip
        raise AssertionError(f"unhandled worker request {request!r}")

    return answer


def _figures(served: _Opened) -> dict[str, object]:
    """The served volume's figures for metrics: used, size, inodes, the log on disk."""
    state = served.state
    volume = served.volume
    return {
        "used": state.used_by_files,
        "inodes": state.inodes_used,
        "size": volume.quota if volume is not None else 0,
        "store_bytes": volume.log.total if volume is not None else 0,
        "checkpoints": volume.checkpoints.written if volume is not None else 0,
        "checkpoint_seconds": volume.checkpoints.seconds if volume is not None else 0.0,
        "compaction_bytes": volume.space.compacted if volume is not None else 0,
    }


async def _take_snapshot(volume: Volume, snap: str) -> dict[str, Any]:
    """Snapshot *volume* as *snap*: the fast step here, between two requests (so the snapshot
    is that instant), the checkpoint by a forked child (a copy-on-write image of the state
    then) while requests go on being served; done once the child has made it durable."""
    staging, header = snapshots.begin_take(volume, snap)
    pid = 0
    try:
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                gc.disable()  # a collection would only copy pages the parent still shares
                checkpoints.detach_from_parent(parent)
                snapshots.write_taken(volume, staging, header)
                code = 0
            except BaseException:
                log.exception("volume %s: writing snapshot %s failed", volume.name, snap)
            finally:
                os._exit(code)
        pidfd = os.pidfd_open(pid)
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        pid = 0
        if os.waitstatus_to_exitcode(status) != 0:
            raise StoreError(f"volume {volume.name}: writing snapshot {snap} failed; see the "
                             "worker's log", ErrorCode.STORE)  # fmt: skip
        staging.name = ""  # the child gave it its name
    finally:
        if pid:  # cancelled (the worker stops): the snapshot is not made
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        staging.close()
    volume.space.refresh_shared()
    return header


async def _serve(
    served: _Opened | _FromEngine,
    control: socket.socket | None,
    status: dict[str, object],
    operations: VolumeOperations,
) -> None:
    stats = operations.stats
    await operations.start()
    async with trio.open_nursery() as nursery:
        if served.volume is not None:
            nursery.start_soon(_housekeeping, served.volume)
        tasks = 1
        if isinstance(served, _FromEngine):
            from volfs.pg.feed import ChangeFeed

            feed = ChangeFeed(served.model, pyfuse3.invalidate_inode, pyfuse3.invalidate_entry)
            nursery.start_soon(feed.run)
            nursery.start_soon(served.model.lease.keep)
            tasks = ENGINE_TASKS
        nursery.start_soon(_stop_on_signals)
        if control is not None:
            nursery.start_soon(workerctl.serve, control, _answer(served, status, stats))
        # One reading task for the local model: its handlers never await, so a second task
        # could not overlap with the first; it would only cost a lock hand-off between the
        # two on every request.
        await pyfuse3.main(min_tasks=1, max_tasks=tasks)
        nursery.cancel_scope.cancel()


class _Opened:
    """What a worker serves: a volume (locked, loaded, writable) or a snapshot of one
    (NAME@SNAP: loaded read-only, its shared lock held so it is not removed meanwhile)."""

    def __init__(self, store: StoreRoot, name: str) -> None:
        self.volume: Volume | None = None
        self._held = -1
        if "@" in name:
            self.state: Volume | ReadOnlyState
            self.state, self._held = history.load(store, *snapshots.parse_name(name))
        else:
            self.state = self.volume = store.open_volume(name)

    def close(self) -> None:
        self.state.close()
        if self._held >= 0:
            os.close(self._held)
            self._held = -1


class _FromEngine:
    """A volume served from an engine (PostgreSQL): its model, one session of it."""

    volume = None  #: no local store volume: nothing to housekeep, resize or snapshot here

    def __init__(self, url: str, name: str, lease: float | None) -> None:
        # Imported here: psycopg costs a local volume's worker a quarter of its start.
        from volfs.pg.lease import LEASE
        from volfs.pg.model import PgModel

        self.model: PgModel = PgModel(url, name, lease_seconds=lease or LEASE)
        self.model.open()

    async def figures(self) -> dict[str, object]:
        """Used, inodes and size as the engine has them now (metrics, `volfsd stats`), and how
        many steps were run again after a serialization failure (`retries`)."""

        def step(view: VolumeView) -> dict[str, object]:
            return {
                "used": view.used_by_files,
                "inodes": view.inodes_used,
                "size": view.quota,
                "store_bytes": 0,
            }  # no log on this host

        return {**await self.model.run(step), "retries": self.model.retries}

    def close(self) -> None:
        self.model.close()


def serve(
    root: Path,
    name: str,
    mountpoint: Path,
    read_only: bool,
    ready_fd: int | None,
    run_dir: Path | None = None,
    engine_url: str | None = None,
    lease: float | None = None,
) -> None:
    """Serve volume *name* at *mountpoint* until it is unmounted or a signal arrives.

    With *run_dir* (a daemon's), also answer on the worker control socket there, so that
    the daemon, or the next one, can find and adopt this worker.  With *engine_url*, the
    volume is the one of that name in that PostgreSQL engine, not in the store at *root*,
    and this worker's session of it holds a lease of *lease* seconds (`volfs.pg.lease`).
    """
    # Loading makes an object or more per file and no reference cycles: collections during
    # it would only cost (half the load time at 300k files), and scanning those long-lived
    # objects again at every later full collection would make each request dearer the larger
    # the volume.  So: no collector while loading, and what was loaded is frozen.
    store = StoreRoot(root)
    served: _Opened | _FromEngine
    if engine_url is not None:
        served = _FromEngine(engine_url, name, lease)
        operations = VolumeOperations(served.model, read_only=read_only, locks=True)
    else:
        gc.disable()
        try:
            served = _Opened(store, name)
        finally:
            gc.enable()
        gc.freeze()
        read_only = read_only or served.volume is None
        operations = VolumeOperations(LocalModel(served.state), read_only=read_only)
    if served.volume is not None:
        served.volume.log.on_flush = operations.stats.flushed
    try:
        pyfuse3.init(operations, str(mountpoint), mount_options(name, read_only))
    except RuntimeError as exc:
        served.close()
        raise VolfsError(f"cannot mount {name} at {mountpoint}: {exc}") from None
    clean = False
    control_path = None if run_dir is None else workerctl.socket_path(run_dir, name)
    control = None
    try:
        if control_path is not None:
            control = workerctl.listen(control_path)
        entry = mounts.find_mount(mountpoint)
        device = entry.device if entry is not None else ""
        if device and served.volume is not None:  # what `ls` matches mounts by, and
            store.record_device(name, device)  # `umount` checks a mount against
        _raise_read_ahead(device)
        log.info("volume %s mounted at %s (pid %d)", name, mountpoint, os.getpid())
        status: dict[str, object] = {
            "protocol": workerctl.PROTOCOL,
            "version": __version__,
            "name": name,
            "root": str(root),
            "pid": os.getpid(),
            "mountpoint": str(mountpoint),
            "device": device,
            "read_only": read_only,
            "pyfuse3": pyfuse3_build.describe(),
        }
        if ready_fd is not None:
            try:
                os.write(ready_fd, f"ok {device}\n".encode())
            except BrokenPipeError:  # the daemon that started us stopped meanwhile
                log.warning("volume %s: the daemon that started this worker is gone; serving "
                            "on (the next daemon adopts the worker)", name)  # fmt: skip
            os.close(ready_fd)
            ready_fd = None
        trio.run(_serve, served, control, status, operations)
        clean = True
    finally:
        if control_path is not None:
            with contextlib.suppress(OSError):
                control_path.unlink()
        # The volume must close (checkpoint) whole: a late SIGTERM must not cut it short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # unmount=True detaches the mount if the kernel still has it (signal, error).
        pyfuse3.close(unmount=True)
        if served.volume is not None:
            with contextlib.suppress(OSError, VolfsError):
                store.record_device(name, None)
        served.close()
        log.info("volume %s at %s: %s", name, mountpoint, "unmounted" if clean else "stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m volfs.worker")
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--mountpoint", required=True, type=Path)
    parser.add_argument("--read-only", action="store_true")
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("--run-dir", type=Path, help="the daemon's: serve a control socket there")
    parser.add_argument("--log-format", choices=logs.FORMATS, default="text")
    parser.add_argument("--journal", action="store_true", help="log to the journal (natively)")
    parser.add_argument("--engine-url-fd", type=int,
                        help="serve the volume from the PostgreSQL engine whose URL this "
                        "inherited descriptor holds (read to its end, then closed)")  # fmt: skip
    parser.add_argument("--lease", type=_seconds,
                        help="seconds the session's lease on an engine volume lasts (default "
                        "15): a dead host's locks outlive it by at most that")  # fmt: skip
    args = parser.parse_args(argv)
    logs.configure(args.log_format, logs.WORKER_LAYOUT, journal=args.journal, volume=args.name)
    try:
        url = None if args.engine_url_fd is None else _read_url(args.engine_url_fd)
        serve(args.root, args.name, args.mountpoint, args.read_only, args.ready_fd, args.run_dir,
              url, args.lease)  # fmt: skip
    except VolfsError as exc:
        log.error("%s", exc)
        if args.ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(args.ready_fd, f"error: {exc}\n".encode())
        return 1
    return 0


def _seconds(text: str) -> float:
    """A positive number of seconds (argparse's type for ``--lease``)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < 86400:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return seconds


def _read_url(fd: int) -> str:
    """The engine URL an inherited descriptor holds: never on the command line, where `ps`
    would show its password."""
    chunks = []
    try:
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
    except OSError as exc:
        raise VolfsError(f"cannot read the engine URL from descriptor {fd}: {exc.strerror}",
                         ErrorCode.INVALID) from None  # fmt: skip
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    url = b"".join(chunks).decode().strip()
    if not url:
        raise VolfsError(f"descriptor {fd} holds no engine URL", ErrorCode.INVALID)
    return url


if __name__ == "__main__":
    sys.exit(main())
