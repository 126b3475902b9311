"""The volume names of every engine a host knows, as one namespace, with what this host
serves of each: what `create`, `ls` and `inspect` do, for the supervisor.

The local store's volumes are described from the store (`volfs.catalog.describe`); a cluster
engine's (`volfs.engines`) from its database, in a thread, with this host's mounts of it.  A
name is the local store's if the store has it (`Engines.check_free` keeps names unique).
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from volfs import requests
from volfs.catalog import LOCAL_ENGINE, describe, describe_snapshot
from volfs.engines import Engines, describe_cluster
from volfs.errors import ErrorCode, VolfsError
from volfs.served import Served
from volfs.store import history
from volfs.store.headers import check_name
from volfs.store.root import StoreRoot

log = logging.getLogger(__name__)

#: What `ls` and `inspect` show of one volume (catalog.describe).
VolumeInfo = dict[str, Any]


class Namespace:
    """The volumes of *root* and of the cluster engines, and *served*: the supervisor's
    records of the ones this host serves (*bind*: through staging mounts, as root)."""

    def __init__(self, root: StoreRoot, served: dict[str, Served], bind: bool) -> None:
        self.root = root
        self.served = served
        self._bind = bind
        self.engines = Engines(root, {})  #: the config's, once the supervisor has read it

    def describe(self, name: str) -> VolumeInfo:
        """What `ls` and `inspect` show of volume *name*, with what the supervisor knows."""
        served = self.served.get(name)
        describer = describe_snapshot if "@" in name else describe
        if served is None:
            return describer(self.root, name)
        staging = served.staging if self._bind else None
        return describer(self.root, name, served.status, staging, served.read_only,
                         device=served.device or None)  # fmt: skip

    async def info(self, name: str) -> VolumeInfo:
        """`describe`, for a volume of any engine (a cluster engine is asked in a thread);
        NOT_FOUND if none holds it."""
        if "@" in name or self.root.exists(name):
            self.check_exists(name)
            return self.describe(name)
        found = await trio.to_thread.run_sync(self.engines.find, name)
        if found is None or found[1] is None:
            raise VolfsError(f"no such volume: {name[:80]}", ErrorCode.NOT_FOUND)
        return self._with_mounts(describe_cluster(name, found[0], found[1]))

    def _with_mounts(self, row: VolumeInfo) -> VolumeInfo:
        """A cluster volume's *row* with what this host serves of it."""
        served = self.served.get(row["name"])
        if served is not None:
            row["status"] = served.status
            row["mounts"] = sorted(str(p) for p in served.paths)
            row["read_only"] = [str(p) for p in served.read_only]
        return row

    async def locate(self, name: str) -> str | None:
        """`Engines.locate`, in a thread."""
        return await trio.to_thread.run_sync(self.engines.locate, name)

    async def create(self, request: requests.CreateRequest) -> VolumeInfo:
        engine = request.engine or LOCAL_ENGINE
        if engine != LOCAL_ENGINE:
            await trio.to_thread.run_sync(self.engines.create, request, engine)
            return await self.info(request.name)
        if self.engines.clusters:
            await trio.to_thread.run_sync(self.engines.check_free, request.name, LOCAL_ENGINE)
        self.root.create_volume(request.name, request.size, request.labels,
                                inodes=request.inodes, uid=request.uid, gid=request.gid,
                                mode=request.mode)  # fmt: skip
        return self.describe(request.name)

    async def ls(self, request: requests.LsRequest) -> list[VolumeInfo]:
        if not self.engines.clusters:
            return [self.describe(n) for n in self.root.names()]
        found = await trio.to_thread.run_sync(self.engines.listing)
        for engine, why in found.unreachable.items():
            log.warning("ls: engine %s left out: %s", engine, why)
        rows = []
        for name, (engine, row) in sorted(found.volumes.items()):
            cluster = row is not None and self._with_mounts(describe_cluster(name, engine, row))
            rows.append(cluster or self.describe(name))
        return rows

    async def inspect(self, request: requests.InspectRequest) -> list[VolumeInfo]:
        return [await self.info(name) for name in request.names]

    def check_exists(self, name: str) -> None:
        """NOT_FOUND unless volume *name*, or snapshot NAME@SNAP, exists."""
        if "@" in name:
            history.check_exists(self.root, name)
        elif not self.root.exists(check_name(name)):
            raise VolfsError(f"no such volume: {name[:80]}", ErrorCode.NOT_FOUND)
