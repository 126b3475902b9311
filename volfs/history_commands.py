"""The daemon's commands on a volume's history: snapshot, clone, rollback, snapshot listings.

A served volume is snapshotted by its worker, between two requests (`TakeSnapshotRequest`),
so the snapshot is one instant of the mounted file system; one nobody serves is snapshotted
in the store (`history.take_unserved`).  Clones read a snapshot only, so they are made
whether its volume is mounted or not; rollback needs the volume unmounted.  The commands are
plain async methods on typed requests, for the control server and the Docker driver alike.
"""

from __future__ import annotations

from functools import partial

import trio

from volfs import requests
from volfs.errors import ErrorCode, VolfsError
from volfs.namespace import VolumeInfo
from volfs.store import history
from volfs.store.snapshots import parse_name
from volfs.supervisor import Supervisor

#: How long a worker may take to snapshot its volume (a checkpoint's worth of metadata).
SNAPSHOT_TIMEOUT = 120.0


class HistoryCommands:
    """Snapshots, clones and rollback of the volumes *supervisor* serves (or not)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.root = supervisor.root

    async def snapshot(self, request: requests.SnapshotRequest) -> VolumeInfo:
        name, snap = parse_name(request.snapshot)
        take = requests.TakeSnapshotRequest(snapshot=snap)
        unserved = partial(history.take_unserved, self.root, name, snap)
        await self.supervisor.change(name, "snapshotted", take, unserved, SNAPSHOT_TIMEOUT)
        return self.supervisor.namespace.describe(request.snapshot)

    async def clone(self, request: requests.CloneRequest) -> VolumeInfo:
        name, snap = parse_name(request.snapshot)
        clone = partial(history.clone, self.root, name, snap, request.name, request.size)
        await trio.to_thread.run_sync(clone)
        return self.supervisor.namespace.describe(request.name)

    async def rollback(self, request: requests.RollbackRequest) -> VolumeInfo:
        name, snap = parse_name(request.snapshot)
        supervisor = self.supervisor
        served = supervisor.served.get(name) or supervisor.stopping.get(name)
        if served is not None:
            where = ", ".join(str(p) for p in served.paths) or "its staging path"
            raise VolfsError(
                f"volume {name} is mounted at {where}: unmount it to roll it back to "
                f"{request.snapshot}",
                ErrorCode.BUSY,
            )
        await trio.to_thread.run_sync(history.rollback, self.root, name, snap)
        return supervisor.namespace.describe(name)

    async def snapshots(self) -> list[VolumeInfo]:
        """Every snapshot of the store, as `ls --snapshots` shows them."""
        return [self.supervisor.namespace.describe(label) for label in history.labels(self.root)]
