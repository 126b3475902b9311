"""The supervisor of a host's volumes: what `volfsd serve` does, whoever asks for it.

The supervisor runs one mount worker per served volume: the worker mounts the volume at a
*staging* path under the runtime directory, and every mount point a user asks for is a bind
mount of that staging mount (the model Kubernetes CSI uses).  So all paths of a volume are one
file system: the same bytes, the same POSIX and flock locks, at once.

If a worker dies, the supervisor brings the volume back at all its paths (served.py).  Workers
outlive the daemon: SIGTERM (or a crash) of the daemon leaves them serving, and the next
daemon adopts them (adoption.py); `umount --all` is the full stop.  Without root there are no
bind mounts: a volume is then mounted directly, at one path only.

Its commands are plain async methods taking the typed requests of requests.py: the control
server (control_server.py) is one front end, and others (a Docker volume plugin) call the same
methods.  It knows nothing of frames or sockets.  Every refusal is a VolfsError with a code.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import trio

from volfs import __version__, adoption, control, mounts, requests, sysmount, users, workerctl
from volfs.catalog import LOCAL_ENGINE, check_limits_match, with_health
from volfs.config import DaemonConfig
from volfs.engines import Engines
from volfs.errors import ErrorCode, VolfsError
from volfs.mount_watch import unmounted_paths, watch_mount_table
from volfs.mountpoint import PRESENT, normalize, open_mountpoint, prepare
from volfs.namespace import Namespace, VolumeInfo
from volfs.remembered import ContainerClaims, RememberedMounts
from volfs.served import DEAD, MOUNTED, REFUSED, MountPath, Served
from volfs.spawn import start_worker
from volfs.store import history
from volfs.store.root import StoreRoot
from volfs.store.snapshots import check_target, parse_name

log = logging.getLogger(__name__)

#: How long a worker whose mounts are gone may take to end by itself before it gets SIGTERM.
STOP_GRACE = 10.0
#: How long a worker may take to end after SIGTERM (it checkpoints first) before it is killed.
STOP_TIMEOUT = 120.0
RESTART_DELAYS = (0.5, 1, 2, 5, 10, 30)

T = TypeVar("T")


class Supervisor:
    """The volumes of *root* served by workers, supervised from *nursery*.

    *run_dir* holds the workers' sockets, the staging mounts and the remembered mounts.
    """

    def __init__(self, root: StoreRoot, run_dir: Path, nursery: trio.Nursery) -> None:
        self.root = root
        self.run_dir = run_dir
        self.served: dict[str, Served] = {}
        #: Volumes unmounted whose worker has not ended yet (files open on a lazy unmount).
        self.stopping: dict[str, Served] = {}
        self.remembered = RememberedMounts(run_dir)
        #: The Docker container mounts that hold each volume (docker_driver.py).
        self.claims = ContainerClaims(run_dir)
        self._admin = trio.Lock()  # one change of mounts at a time
        self._nursery = nursery
        self._started = time.time()
        self._bind = os.geteuid() == 0  # bind mounts need root
        #: Every engine's volumes; its engines are the config's once `start` has read it.
        self.namespace = Namespace(root, self.served, self._bind)

    # -- start-up ---------------------------------------------------------------------------

    async def start(self, config: DaemonConfig | None) -> None:
        """Adopt the workers an earlier daemon left serving, then mount what *config*
        declares and what was mounted on request before."""
        if config is not None:
            self.namespace.engines = Engines(self.root, config.engines)
        for served in await adoption.running_workers(self.root, self.run_dir):
            if "@" not in served.name and not self.root.exists(served.name):
                served.engine = await self.namespace.locate(served.name) or LOCAL_ENGINE
            self._adopt(served)
        if config is not None:
            await self._mount_declared(config)
        await self._mount_remembered()
        self._nursery.start_soon(watch_mount_table, self._admin, self._forget_unmounted)

    def _adopt(self, served: Served) -> None:
        """Serve *served*, an adopted worker's volume (adoption.py), from now on."""
        self.served[served.name] = served
        self._nursery.start_soon(self._supervise, served)

    async def _mount_declared(self, config: DaemonConfig) -> None:
        async with self._admin:
            for name, spec in config.volumes.items():
                try:
                    if spec.engine == LOCAL_ENGINE:
                        self.root.create_volume(
                            name, size=spec.size, labels=spec.labels, inodes=spec.inodes,
                            uid=spec.uid, gid=spec.gid, mode=spec.mode,
                        )  # fmt: skip
                    elif await self.namespace.locate(name) is None:
                        await self.namespace.create(requests.CreateRequest(
                            name, spec.size, spec.labels, spec.inodes, spec.uid, spec.gid,
                            spec.mode, engine=spec.engine,
                        ))  # fmt: skip
                    for path in spec.paths:
                        await self._mount(name, path, spec.read_only, create=True)
                except VolfsError as exc:
                    log.error("declared volume %s: %s", name, exc, extra={"volume": name})

    async def _mount_remembered(self) -> None:
        """Bring back the mounts made on request: adopt the ones still live, replace dead
        ones, and never create a directory or follow a symlink (this is a heal)."""
        async with self._admin:
            for name, path, read_only in self.remembered.entries():
                try:
                    if not isinstance(name, str):
                        raise TypeError("a volume name that is not a string")
                    if name not in self.served and self.root.is_served(check_target(name)):
                        served = adoption.silent_worker(self.root, self.run_dir, name)
                        if served is not None:
                            self._adopt(served)
                    adopted = self.served.get(name)
                    if (
                        adopted is not None
                        and adopted.adopted
                        and adopted.device
                        and normalize(path) not in adopted.paths
                        and not _holds_mount_of(normalize(path), name)
                    ):
                        # Its worker served on (its binds were found by its device), and no
                        # mount of the volume is left there (a dead one: a heal the last
                        # daemon did not finish), so nothing but a user took this one away.
                        self._forget_path(adopted, normalize(path), "while no daemon ran")
                        continue
                    await self._mount(check_target(name), normalize(path), bool(read_only))
                except (VolfsError, TypeError) as exc:
                    # Kept (and shown by `status`): the mount point may come right again, and
                    # forgetting it would leave it bare for good.
                    log.error("volume %s: not mounted at %s again: %s", name, path, exc,
                              extra={"volume": name})  # fmt: skip
                    if isinstance(name, str) and isinstance(path, str):
                        staging = self.run_dir / "staging" / name
                        served = self.served.setdefault(name, Served(name, staging, status="down"))
                        mount_path = MountPath(Path(path), bool(read_only), REFUSED, str(exc))
                        served.paths.setdefault(Path(path), mount_path)

    # -- commands -------------------------------------------------------------------------------

    async def status(self, request: requests.StatusRequest) -> dict[str, Any]:
        return {
            "daemon": {
                "pid": os.getpid(),
                "version": __version__,
                "uptime": round(time.time() - self._started, 1),
                "socket": str(self.run_dir / control.SOCKET_NAME),
                "store": str(self.root.path),
            },
            "volumes": [
                with_health(self.root, n, self.served[n].describe(self.problems(n)))
                if self.served[n].engine == LOCAL_ENGINE
                else {**self.served[n].describe(self.problems(n)), "engine": self.served[n].engine}
                for n in sorted(self.served)
            ],
            "engines": await trio.to_thread.run_sync(self.namespace.engines.reachability),
        }

    def problems(self, name: str) -> list[str]:
        """What is wrong with volume *name* that its served record does not say: container
        mounts that hold a mount of it which a worker restart replaced."""
        replaced = [c for c in self.claims.of(name) if c.replaced]
        if not replaced:
            return []
        return [
            f"its mount was replaced (its worker restarted) while {len(replaced)} container "
            "mount(s) held it; those containers see ENOTCONN until they are restarted"
        ]

    async def mount(self, request: requests.MountRequest) -> VolumeInfo:
        name, read_only = request.name, request.read_only
        async with self._admin:
            self._forget_unmounted()  # a path just unmounted by umount(8) is mounted again
            if "@" in name:  # a snapshot: never created, never written
                self.namespace.check_exists(name)
                read_only = True
            elif self.root.exists(name):
                check_limits_match(name, self.root.header(name), request.size, request.inodes)
            elif await self.namespace.locate(name) is not None:
                pass  # a cluster engine's: `_start_volume` finds it again
            elif not request.create:
                raise VolfsError(f"no such volume: {name}", ErrorCode.NOT_FOUND)
            else:
                self.root.create_volume(name, size=request.size, inodes=request.inodes)
            await self._mount(name, request.mountpoint, read_only, create=True)
            self.remembered.remember(name, request.mountpoint, read_only)
        return await self.namespace.info(name)

    async def umount(self, request: requests.UmountRequest) -> dict[str, str]:
        path, lazy = request.mountpoint, request.lazy
        async with self._admin:
            served = next((s for s in self.served.values() if path in s.paths), None)
            if served is None:
                raise VolfsError(
                    f"{path} is not a volume mount of this daemon", ErrorCode.NOT_MOUNTED
                )
            last = len(served.paths) == 1
            if not lazy:
                self._refuse_if_in_use(served, path if not last else None)
            await self._unmount_path(served, path)
            self.remembered.forget(path)
            if not last:
                return {"mountpoint": str(path)}
            self._detach_volume(served)
        if lazy:  # files may stay open on it: the worker serves them until they are closed
            self._nursery.start_soon(self._wait_stopped, served, math.inf)
        else:  # the worker ends once it has checkpointed; wait outside the lock for that
            await self._wait_stopped(served, STOP_GRACE)
        return {"mountpoint": str(path)}

    async def umount_all(self, request: requests.UmountAllRequest) -> dict[str, Any]:
        """The full stop: every volume unmounted (lazily where busy), every worker ended."""
        started = time.monotonic()
        async with self._admin:
            leaving = list(self.served.values())
            for served in leaving:
                for path in list(served.paths):
                    try:
                        await self._unmount_path(served, path)
                    except VolfsError as exc:  # stop the others all the same
                        log.error("volume %s: %s", served.name, exc, extra={"volume": served.name})
                    self.remembered.forget(path)
                self._detach_volume(served)
            async with trio.open_nursery() as nursery:
                for served in leaving:
                    nursery.start_soon(self._wait_stopped, served, STOP_GRACE)
        return {"volumes": [s.name for s in leaving],
                "seconds": round(time.monotonic() - started, 2)}  # fmt: skip

    async def rm(self, request: requests.RmRequest) -> dict[str, str]:
        name = request.name
        async with self._admin:
            if "@" not in name and not self.root.exists(name):
                engine = await self.namespace.locate(name)
                if engine is not None:  # a cluster engine's: it refuses while a host serves it
                    await self._unmount_for_rm(name, request.force)
                    await trio.to_thread.run_sync(
                        self.namespace.engines.cluster(engine).remove, name
                    )
                    return {"name": name}
            self.namespace.check_exists(name)
            if "@" not in name and not request.recursive:
                history.refuse_if_snapshotted(self.root, name)  # before --force unmounts it
            # A volume's snapshots mounted here go with it (-r), each unmounted like it.
            labels = [n for n in self.served if request.recursive and n.startswith(f"{name}@")]
            for label in [name, *labels]:
                await self._unmount_for_rm(label, request.force)
            if self.root.is_served(name):
                raise VolfsError(
                    f"volume {name} is being served by another process", ErrorCode.ALREADY_SERVED
                )
            if "@" in name:
                history.remove(self.root, *parse_name(name))
            else:
                self.root.remove_volume(name, request.recursive)
                self.claims.drop(name)
        return {"name": name}

    async def _unmount_for_rm(self, name: str, force: bool) -> None:
        """Unmount volume or snapshot *name* if it is served, for `rm`: only with *force*,
        never while in use; wait for its worker to end."""
        served = self.served.get(name)
        if served is not None:
            if not force:
                mounted = ", ".join(str(p) for p in served.paths) or str(served.staging)
                raise VolfsError(
                    f"{_kind(name)} {name} is mounted at {mounted}: unmount it first or "
                    "use --force",
                    ErrorCode.BUSY,
                )
            self._refuse_if_in_use(served, None)
            for path in list(served.paths):
                await self._unmount_path(served, path)
                self.remembered.forget(path)
            self._detach_volume(served)
        if name in self.stopping:
            await self._wait_stopped(self.stopping[name], STOP_GRACE)

    async def resize(self, request: requests.ResizeRequest) -> VolumeInfo:
        """New limits: a mounted volume's through its worker (at once), else in the store."""
        limits = requests.SetLimitsRequest(size=request.size, inodes=request.inodes)
        resize = partial(self.root.resize, request.name, request.size, request.inodes)
        await self.change(request.name, "resized", limits, resize)
        return self.namespace.describe(request.name)

    async def change(
        self,
        name: str,
        what: str,
        request: requests.WorkerRequest,
        unserved: Callable[[], T],
        timeout: float = workerctl.CALL_TIMEOUT,
    ) -> dict[str, Any] | T:
        """Change volume *name* (*what* it is then: "resized") by *request* to its worker if
        this daemon serves it, else by *unserved* in a thread (it loads the volume, which may
        take seconds); BUSY if another process serves it or it is still being unmounted."""
        async with self._admin:
            if not self.root.exists(name):
                engine = await self.namespace.locate(name)
                raise VolfsError(
                    f"no such volume: {name}" if engine is None else
                    f"volume {name} is on cluster engine {engine}: it cannot be {what} yet",
                    ErrorCode.NOT_FOUND if engine is None else ErrorCode.INVALID,
                )  # fmt: skip
            served = self.served.get(name)
            if served is not None and served.worker is not None and served.worker.running:
                sock = workerctl.socket_path(self.run_dir, name)
                try:
                    return await workerctl.call(sock, request, timeout)
                except workerctl.WorkerUnreachable as exc:
                    raise VolfsError(
                        f"volume {name}: its worker could not be reached ({exc}); unmount the "
                        f"volume, and it can be {what} then",
                        ErrorCode.UNAVAILABLE,
                    ) from None
            if name in self.stopping or self.root.is_served(name):
                raise VolfsError(
                    f"volume {name} is served by another process or still unmounting: "
                    "try again once it is unmounted",
                    ErrorCode.BUSY,
                )
            return await trio.to_thread.run_sync(unserved)

    # -- mounting -------------------------------------------------------------------------------

    async def _mount(self, name: str, path: Path, read_only: bool, create: bool = False) -> None:
        """Serve *name* at *path*: start its worker if it has none, then bind *path*."""
        served = self.served.get(name)
        existing = served.paths.get(path) if served is not None else None
        if existing is not None and existing.read_only != read_only:
            mode = "read-only" if existing.read_only else "read-write"
            raise VolfsError(f"volume {name} is already mounted {mode} at {path}")
        if existing is not None and existing.state == MOUNTED:
            return  # asked again for what is there: nothing to do
        if served is not None and not self._bind and existing is None:
            raise VolfsError(
                f"volume {name} is already mounted at {next(iter(served.paths))}: a second "
                "mount point needs bind mounts, which need root",
                ErrorCode.PERMISSION,
            )
        mount_path = existing or MountPath(path, read_only)
        # The mount point is checked before a worker starts, so a bad one costs nothing.
        with open_mountpoint(path, create=create) as target:
            how = prepare(target, name, served.device if served is not None else "")
        if served is None or served.worker is None:
            served = await self._start_volume(name, path, served)
        if self._bind:
            served.bind_path(mount_path, create=False)
        else:
            mount_path.state = MOUNTED
        served.paths[path] = mount_path
        if how != PRESENT:
            log.info("volume %s mounted at %s%s", name, path, " (read-only)" if read_only else "",
                     extra={"volume": name})  # fmt: skip

    async def _start_volume(self, name: str, path: Path, served: Served | None) -> Served:
        """Start the worker of *name* (whose *served* record, if any, has none)."""
        leaving = self.stopping.get(name)
        if leaving is not None and leaving.worker is not None:
            with trio.move_on_after(STOP_GRACE):
                await leaving.worker.wait()
            if leaving.worker.running:
                raise VolfsError(
                    f"volume {name} is still being unmounted: something still holds it (files "
                    "open on a path unmounted lazily, or a container); close them and try again",
                    ErrorCode.BUSY,
                )
        if self.root.is_served(name):
            raise VolfsError(
                f"volume {name} is being served by another process (volfsd mount -f?)",
                ErrorCode.ALREADY_SERVED,
            )
        if served is None:
            served = Served(name, self._staging(name, path))
            if "@" not in name and not self.root.exists(name):
                served.engine = await self.namespace.locate(name) or LOCAL_ENGINE
        await start_worker(self.root, self.run_dir, served, self._bind, self._engine_url(served))
        self.served[name] = served
        self._nursery.start_soon(self._supervise, served)
        return served

    def _staging(self, name: str, path: Path) -> Path:
        """Where the worker of *name* mounts: its staging path, or without root *path*."""
        return self.run_dir / "staging" / name if self._bind else path

    def _engine_url(self, served: Served) -> str | None:
        """The URL of the cluster engine that holds *served*; None for a local volume."""
        return (
            None
            if served.engine == LOCAL_ENGINE
            else self.namespace.engines.cluster(served.engine).url
        )

    async def _supervise(self, served: Served) -> None:
        """Wait for the worker to end; bring the volume back if nobody asked it to stop."""
        while True:
            assert served.worker is not None
            await served.worker.wait()
            if served.stopping:
                return
            code = served.worker.returncode
            log.error("volume %s: its worker exited (pid %d, %s); remounting at %s",
                      served.name, served.worker.pid, "status unknown" if code is None else code,
                      ", ".join(str(p) for p in served.paths),
                      extra={"volume": served.name})  # fmt: skip
            await self._heal(served)
            if served.stopping:
                return

    async def _heal(self, served: Served) -> None:
        """Start a new worker and put its mount at every path of the volume.

        The dead mounts stay on the paths meanwhile (writers get ENOTCONN, not the directory
        under the mount); each is replaced from beneath (served.py).
        """
        served.status = "healing"
        dead_device = served.device  # what containers that bound the volume still hold
        for mount_path in served.paths.values():
            if mount_path.state == MOUNTED:
                mount_path.state = DEAD
        if not self._bind:  # no way to replace a mount from beneath: detach, then mount
            for path in served.paths:
                mounts.detach(path, lazy=True)
        for delay in (*RESTART_DELAYS, *([RESTART_DELAYS[-1]] * 1000)):
            if served.stopping:
                return
            try:
                async with self._admin:
                    if served.stopping:
                        return
                    await start_worker(self.root, self.run_dir, served, self._bind,
                                       self._engine_url(served))  # fmt: skip
                    for mount_path in served.paths.values():
                        if self._bind:
                            served.rebind(mount_path)
                        else:
                            mount_path.state = MOUNTED
                served.restarts += 1
                self.claims.mark_replaced(served.name, dead_device or "?")
                log.info("volume %s is back at %s", served.name,
                         ", ".join(str(p) for p, m in served.paths.items()
                                   if m.state == MOUNTED),
                         extra={"volume": served.name})  # fmt: skip
                return
            except (VolfsError, OSError) as exc:  # nothing here may take the daemon down
                served.status = "down"
                served.problems[:] = [f"restart failed: {exc}"]
                log.error("volume %s: restart failed: %s; retrying in %s s", served.name, exc,
                          delay, extra={"volume": served.name})  # fmt: skip
                await trio.sleep(delay)

    # -- unmounting -----------------------------------------------------------------------------

    def _refuse_if_in_use(self, served: Served, path: Path | None) -> None:
        """Refuse to unmount *path* (None: the whole volume) while processes use it.

        One path of several: only files and directories opened through that bind count (the
        kernel cannot tell which bind another namespace's copy came from, and the volume stays
        for them anyway through its other paths).
        """
        if not served.device:
            return
        exclude = {os.getpid()} | ({served.worker.pid} if served.worker is not None else set())
        through = None
        if path is not None:
            try:
                with open_mountpoint(path) as target:
                    top = target.top()
            except VolfsError:
                return  # the mount point is gone or changed: nothing of ours is there to use
            if top is None or top.device != served.device:
                return
            through = {top.mount_id}
        found = users.users_of(served.device, exclude, through)
        if found:
            what = str(path) if path is not None else f"volume {served.name}"
            raise VolfsError(
                f"{what} is busy, in use by {users.describe_users(found)}: stop them, or use "
                "--lazy to detach now",
                ErrorCode.BUSY,
            )

    async def _unmount_path(self, served: Served, path: Path) -> None:
        """Detach *path* (lazily: open files stay usable until closed) if the mount there is
        still this volume's; forget the path either way."""
        mount_path = served.paths[path]
        try:
            if self._bind:
                with open_mountpoint(path) as target:
                    if served.owns(target):
                        sysmount.detach(target.fd)
                    elif mount_path.state != REFUSED:
                        log.warning("volume %s: %s was unmounted behind volfsd's back",
                                    served.name, path, extra={"volume": served.name})  # fmt: skip
            else:
                entry = mounts.find_mount(path)
                if entry is None or entry.fstype != mounts.FSTYPE:
                    log.warning("volume %s: %s was unmounted behind volfsd's back",
                                served.name, path, extra={"volume": served.name})  # fmt: skip
                else:
                    problem = await trio.to_thread.run_sync(mounts.detach, path, True)
                    if problem is not None:
                        raise VolfsError(f"cannot unmount {path}: {problem}", problem.code)
        except VolfsError as exc:  # the mount point is gone or changed: nothing of ours there
            log.warning("volume %s: %s", served.name, exc, extra={"volume": served.name})
        del served.paths[path]
        log.info("volume %s unmounted from %s", served.name, path, extra={"volume": served.name})

    def _forget_unmounted(self) -> None:
        """Forget the paths unmounted behind the daemon's back (umount(8), ``umount -l``,
        umount2() by any program): the user's unmounts, not to be healed or brought back.
        Call it holding `_admin`, under which the daemon's own mounts and unmounts are made,
        so that none of those is mistaken for one."""
        if not any(served.paths for served in self.served.values()):
            return  # nothing to lose: the table need not be read
        table = mounts.mount_table()
        for served, path in list(unmounted_paths(self.served.values(), table, self._bind)):
            self._forget_path(served, path, "by umount(8) or another program")

    def _forget_path(self, served: Served, path: Path, how: str) -> None:
        """Forget *path*, unmounted *how*; a volume left without paths is let go."""
        log.info("volume %s: %s was unmounted behind volfsd's back (%s): forgotten",
                 served.name, path, how, extra={"volume": served.name})  # fmt: skip
        served.paths.pop(path, None)
        self.remembered.forget(path)
        if not served.paths:
            self._detach_volume(served)
            # Another namespace (a container) may still hold the volume: as after --lazy.
            self._nursery.start_soon(self._wait_stopped, served, math.inf)

    def _detach_volume(self, served: Served) -> None:
        """Detach the staging mount of a volume whose paths are gone, so that its worker ends.

        That ends the worker's FUSE session (at once, or once the last open file on a lazily
        detached path closes); the worker then checkpoints and exits by itself.
        `_wait_stopped` waits for the end.
        """
        served.stopping = True
        self.served.pop(served.name, None)
        self.stopping[served.name] = served
        if served.worker is None or not served.worker.running:
            return
        if self._bind:
            try:
                with open_mountpoint(served.staging) as staging:
                    if served.owns(staging):
                        sysmount.detach(staging.fd)
                        return
            except (VolfsError, OSError) as exc:
                log.warning("volume %s: staging mount: %s", served.name, exc,
                            extra={"volume": served.name})  # fmt: skip
        served.worker.send_signal(signal.SIGTERM)

    async def _wait_stopped(self, served: Served, grace: float) -> None:
        """Wait for the worker of a detached volume to end: *grace* s by itself, then
        `STOP_TIMEOUT` s after SIGTERM, then it is killed."""
        worker = served.worker
        if worker is not None and worker.running:
            with trio.move_on_after(grace):
                await worker.wait()
            if worker.running:
                worker.send_signal(signal.SIGTERM)
                with trio.move_on_after(STOP_TIMEOUT):
                    await worker.wait()
            if worker.running:
                log.error("volume %s: worker did not stop in time; killing it", served.name,
                          extra={"volume": served.name})  # fmt: skip
                worker.send_signal(signal.SIGKILL)
                await worker.wait()
        if self.stopping.get(served.name) is served:
            del self.stopping[served.name]


def _kind(name: str) -> str:
    return "snapshot" if "@" in name else "volume"


def _holds_mount_of(path: Path, name: str) -> bool:
    """Whether the topmost mount at *path* is a volfs mount of volume *name* (live or dead)."""
    entry = mounts.find_mount(path)
    return entry is not None and entry.fstype == mounts.FSTYPE and entry.source == name
