"""Docker's volume-driver verbs in volfs's terms: the rules behind the plugin's endpoints.

Docker asks a volume driver to create, list and remove volumes and to mount one for each
container that uses it (docker_plugin.py speaks the protocol).  Every verb here is a call of
the supervisor with a typed request, so a Docker volume follows the rules of a volume made
with the CLI: the same names, sizes, owners and in-use checks, and `docker volume ls` lists
the volumes `volfsd create` made too.

A volume Docker mounts is mounted once, at ``RUN_DIR/docker/NAME``: a bind of its staging
mount like any other path of it, which Docker then binds into each container.  Each ``Mount``
is a *claim* (remembered.py's `ContainerClaims`, kept in the runtime directory so that a
restarted daemon knows them); the last ``Unmount`` lets the path go.  Docker gives each
container mount an id of its own, not the container's, so a claim whose container vanished
without an ``Unmount`` (dockerd killed, a container's shim gone) cannot be matched to a
container.  Instead, `reconcile` drops the claims on a volume that nothing outside volfs has
held for :data:`CLAIM_GRACE` seconds: no process with a file or directory on it and no mount
namespace (a container) with a mount of it.

A daemon with cluster engines serves a second driver, ``NAME-cluster`` (`CLUSTER_SUFFIX`), of
Docker's ``global`` scope: the volumes of its cluster engines, which every host that names the
same database serves, created with ``--opt engine=ENGINE`` (needed only when the config has
more than one).  The first driver, of ``local`` scope, keeps to the host's store.  A name is
one volume across engines (`volfs.engines`), so one driver never lists the other's volumes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path
from typing import Any

import trio

from volfs import requests, users
from volfs.catalog import LOCAL_ENGINE, created_at, parse_labels
from volfs.engines import describe_cluster
from volfs.errors import ErrorCode, VolfsError
from volfs.history_commands import HistoryCommands
from volfs.remembered import boot_clock
from volfs.store.headers import check_name
from volfs.supervisor import Supervisor

log = logging.getLogger(__name__)

#: The options of ``docker volume create -d volfs --opt KEY=VALUE``: the `volfsd create` flags
#: of the same names (``labels`` is ``KEY=VALUE,KEY=VALUE``; Docker's own ``--label`` stays
#: Docker's).
CREATE_OPTIONS = ("size", "uid", "gid", "mode", "inodes", "labels", "from")
#: The options of the cluster driver: the engine instead of labels and clones.
CLUSTER_OPTIONS = ("size", "uid", "gid", "mode", "inodes", "engine")
#: The cluster driver's name is the local driver's with this after it.
CLUSTER_SUFFIX = "-cluster"
#: With ``from=NAME@SNAP`` (a clone of that snapshot) the rest comes from the origin.
CLONE_OPTIONS = ("from", "size")
#: What ``docker volume inspect`` shows under Status, of what `ls` shows of a volume.
STATUS_KEYS = ("size", "used", "inodes", "mounts", "created", "status", "labels", "uid", "gid",
               "mode", "snapshots", "snapshot_bytes", "origin")  # fmt: skip
#: How long a claim counts whatever holds the volume: Docker mounts before it starts the
#: container, which only then holds the mount.
CLAIM_GRACE = 120.0
#: How often claims are reconciled while there are any.
RECONCILE_EVERY = 60.0


class DockerDriver:
    """The volume-driver verbs over *supervisor*'s volumes: those of its store, or with
    *cluster* those of its cluster engines; *lock*: the other driver's, if there is one."""

    def __init__(
        self, supervisor: Supervisor, cluster: bool = False, lock: trio.Lock | None = None
    ) -> None:
        self.supervisor = supervisor
        self.cluster = cluster
        #: Docker's scope of the driver's volumes: ``global``: the same on every host.
        self.scope = "global" if cluster else "local"
        self.history = HistoryCommands(supervisor)
        self.claims = supervisor.claims
        self.mount_dir = supervisor.run_dir / "docker"
        # One verb at a time: a Mount racing the last Unmount of the same volume must not
        # find the path mounted and then see it unmounted under it.  The two drivers of a
        # daemon share it (and the claims, which one of them reconciles).
        self.lock = lock or trio.Lock()

    def mountpoint(self, name: str) -> Path:
        return self.mount_dir / name

    # -- the verbs ------------------------------------------------------------------------

    async def create(self, name: str, options: dict[str, Any]) -> None:
        """Create volume *name* with *options* (``--opt``); nothing if it exists alike."""
        allowed = CLUSTER_OPTIONS if self.cluster else CREATE_OPTIONS
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise VolfsError(
                f"unknown option {unknown[0][:40]!r}: volfs volumes take "
                f"{', '.join(allowed)} (e.g. --opt size=10G --opt uid=33)",
                ErrorCode.INVALID,
            )
        if self.cluster:
            options = {**options, "engine": self._engine(options)}
        if "from" in options:
            await self._clone(name, options)
            return
        args: dict[str, object] = {"name": name, **options}
        if "labels" in options:
            labels = options["labels"]
            if not isinstance(labels, str):
                raise VolfsError("labels must be KEY=VALUE,KEY=VALUE", ErrorCode.INVALID)
            args["labels"] = parse_labels([item for item in labels.split(",") if item])
        request = requests.decode(requests.DAEMON_COMMANDS, "create", args)
        assert isinstance(request, requests.CreateRequest)
        async with self.lock:
            await self.supervisor.namespace.create(request)

    async def _clone(self, name: str, options: dict[str, Any]) -> None:
        """Create volume *name* as a clone of ``--opt from=NAME@SNAP``; nothing if it is one
        of that snapshot already (Docker asks to create a volume it knows again)."""
        others = sorted(set(options) - set(CLONE_OPTIONS))
        if others:
            raise VolfsError(
                f"option {others[0]!r} does not go with 'from': a clone has its origin's "
                "settings (only --opt size=... may be given)",
                ErrorCode.INVALID,
            )
        args = {"snapshot": options["from"], "name": name}
        if "size" in options:
            args["size"] = options["size"]
        request = requests.decode(requests.DAEMON_COMMANDS, "clone", args)
        assert isinstance(request, requests.CloneRequest)
        async with self.lock:
            root = self.supervisor.root
            if root.exists(request.name):
                origin = root.header(request.name).get("origin") or {}
                if f"{origin.get('volume')}@{origin.get('snapshot')}" != request.snapshot:
                    raise VolfsError(
                        f"volume {name} exists, and is no clone of {request.snapshot}",
                        ErrorCode.EXISTS,
                    )
                return
            await self.history.clone(request)

    async def remove(self, name: str) -> None:
        """Destroy volume *name*: refused while a container (or anything else) uses it."""
        name = check_name(name)
        async with self.lock:
            await self._reconcile(name)
            held = self.claims.of(name)
            if held:
                raise VolfsError(
                    f"volume {name} is in use by {len(held)} container mount(s): stop and "
                    "remove those containers first",
                    ErrorCode.BUSY,
                )
            await self._release(name)  # Docker's own path, should claims have gone without it
            served = self.supervisor.served.get(name)
            others = sorted(str(p) for p in served.paths) if served is not None else []
            if others:  # `rm`'s own message would point at its --force, which Docker has not
                raise VolfsError(
                    f"volume {name} is mounted by volfsd at {', '.join(others)}: unmount it "
                    "there first (volfsd umount PATH)",
                    ErrorCode.BUSY,
                )
            await self.supervisor.rm(requests.RmRequest(name))

    async def mount(self, name: str, mount_id: str) -> Path:
        """Mount volume *name* for the container mount *mount_id*; where it is mounted."""
        name = check_name(name)
        path = self.mountpoint(name)
        async with self.lock:
            # Claimed first: a daemon killed between the two leaves a claim that reconcile
            # clears, never a mount that nothing claims and nothing would unmount.
            self.claims.add(name, mount_id)
            try:
                self.mount_dir.mkdir(mode=0o700, exist_ok=True)
                # create=False: checked under the supervisor's lock, so an `rm` racing this
                # Mount makes it fail, never mount a new empty volume of the same name.
                await self.supervisor.mount(requests.MountRequest(name, path, create=False))
            except BaseException:
                self.claims.remove(name, mount_id)
                raise
        log.info("volume %s: mounted for Docker (mount id %.12s)", name, mount_id,
                 extra={"volume": name})  # fmt: skip
        return path

    async def unmount(self, name: str, mount_id: str) -> None:
        """End the container mount *mount_id* of *name*; the last one unmounts the volume."""
        name = check_name(name)
        async with self.lock:
            if not self.claims.remove(name, mount_id):
                # Dropped by reconcile, or a daemon of before a reboot: nothing to undo.
                log.warning("volume %s: Docker unmounted mount id %.12s, which held nothing",
                            name, mount_id, extra={"volume": name})  # fmt: skip
            if not self.claims.of(name):
                await self._release(name)

    def _engine(self, options: dict[str, Any]) -> str:
        """The cluster engine a new volume goes to: ``--opt engine``, else the only one."""
        engines = sorted(self.supervisor.namespace.engines.clusters)
        engine = options.get("engine")
        if engine is None and len(engines) == 1:
            return engines[0]
        if not isinstance(engine, str) or engine not in engines:
            raise VolfsError(
                f"say which engine: --opt engine=NAME, one of {', '.join(engines)}",
                ErrorCode.INVALID,
            )
        return engine

    async def _engine_of(self, name: str) -> str:
        """The engine of volume *name* if it is this driver's; NOT_FOUND otherwise."""
        root = self.supervisor.root
        engine = LOCAL_ENGINE if root.exists(name) else await self.supervisor.namespace.locate(name)
        if engine is None or (engine == LOCAL_ENGINE) == self.cluster:
            raise VolfsError(f"no such volume: {name}", ErrorCode.NOT_FOUND)
        return engine

    def path(self, name: str) -> str:
        """Where Docker mounted volume *name*: "" while it has not."""
        served = self.supervisor.served.get(check_name(name))
        path = self.mountpoint(name)
        return str(path) if served is not None and path in served.paths else ""

    async def get(self, name: str) -> dict[str, Any]:
        """What ``docker volume inspect`` shows of volume *name*."""
        name = check_name(name)
        await self._engine_of(name)
        info = await self.supervisor.namespace.info(name)
        problems = list(self.supervisor.problems(name))
        status = {key: info[key] for key in STATUS_KEYS if key in info}
        status["containers"] = len(self.claims.of(name))
        if problems:
            status["problems"] = problems
        return {**self._entry(name, info["created"]), "Status": status}

    async def list(self) -> list[dict[str, Any]]:
        """Every volume of the store, as ``docker volume ls`` lists them: from the headers
        alone (Docker asks at every ``docker volume ls``; `get` describes one in full); for
        the cluster driver, every volume of the cluster engines that can be reached."""
        if self.cluster:
            found = await trio.to_thread.run_sync(self.supervisor.namespace.engines.listing)
            return [
                self._entry(name, describe_cluster(name, engine, row)["created"])
                for name, (engine, row) in sorted(found.volumes.items())
                if row is not None
            ]
        entries = []
        for name in self.supervisor.root.names():
            try:
                created = created_at(self.supervisor.root.header(name))
            except VolfsError:  # damaged: listed all the same, as `volfsd ls` does
                created = ""
            entries.append(self._entry(name, created))
        return entries

    def _entry(self, name: str, created: str) -> dict[str, Any]:
        return {"Name": name, "Mountpoint": self.path(name), "CreatedAt": created}

    # -- claims without containers --------------------------------------------------------

    async def reconcile_forever(self) -> None:
        """Reconcile at start and every :data:`RECONCILE_EVERY` seconds while claims exist;
        a round that fails is logged, and the next one tries again."""
        while True:
            try:
                for name in sorted({c.name for c in self.claims.all()}):
                    async with self.lock:
                        await self._reconcile(name)
            except Exception:  # a full /run, say: the daemon must serve on
                log.exception("reconciling Docker's mount claims failed; trying again later")
            await trio.sleep(RECONCILE_EVERY)

    async def _reconcile(self, name: str) -> None:
        """Drop the claims on *name* if nothing outside volfs holds it (past the grace), and
        let its Docker mount go.

        Held means: a process with something on the volume's mount, or a mount namespace
        with a bind of it of its own (a container's; copies that mount propagation made, as
        in a systemd service's private namespace, do not count).  The mounts a heal replaced
        count too: their containers still hold them, dead, until they restart.
        """
        held = self.claims.of(name)
        if not held or boot_clock() - max(c.since for c in held) < CLAIM_GRACE:
            return
        if any(c.replaced == "?" for c in held):
            return  # a replaced mount of unknown device: only Docker's Unmount ends it
        served = self.supervisor.served.get(name)
        devices = {c.replaced for c in held if c.replaced}
        if served is not None and served.device:
            devices.add(served.device)
        exclude = {os.getpid()}
        if served is not None and served.worker is not None:
            exclude.add(served.worker.pid)
        for device in sorted(devices):
            using = await trio.to_thread.run_sync(
                functools.partial(users.users_of, device, exclude, propagated=False)
            )
            if using:
                return
        self.claims.drop(name)
        log.warning(
            "volume %s: dropped %d Docker mount claim(s) that no container holds any more "
            "(their containers ended without an Unmount)", name, len(held), extra={"volume": name},
        )  # fmt: skip
        await self._release(name)

    async def _release(self, name: str) -> None:
        """Unmount Docker's path of *name*, if it is mounted there."""
        path = self.mountpoint(name)
        served = self.supervisor.served.get(name)
        if served is None or path not in served.paths:
            return
        # Lazily: Docker unmounts once the container is gone, and a file a process of it may
        # still hold open must not make the unmount fail (Docker would keep the claim).
        await self.supervisor.umount(requests.UmountRequest(path, lazy=True))
        with contextlib.suppress(OSError):
            path.rmdir()  # in the daemon's 0700 run dir: no one else can have put it there
