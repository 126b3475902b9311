"""The served volumes' figures as the daemon gathers them: each running worker's request
counts (`volfs.opstats`, asked once over its control socket, all in parallel) and what the
supervisor knows (mounts, restarts).  For the metrics endpoint and `volfsd stats`.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from volfs import requests, workerctl
from volfs.errors import VolfsError
from volfs.supervisor import Supervisor

log = logging.getLogger(__name__)

#: How long a worker may take to answer; one that does not is left out (``up`` false).
WORKER_TIMEOUT = 2.0


async def gather(
    supervisor: Supervisor, names: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """The figures of every served volume (or of *names*): ``mounts``, ``restarts``, and, if
    its worker answered, its counts and volume figures (`WorkerStatsRequest`)."""
    found: dict[str, dict[str, Any]] = {}

    async def ask(name: str) -> None:
        sock = workerctl.socket_path(supervisor.run_dir, name)
        try:
            found[name].update(await workerctl.call(sock, requests.WorkerStatsRequest(),
                                                    WORKER_TIMEOUT))  # fmt: skip
        except (workerctl.WorkerUnreachable, VolfsError) as exc:
            log.debug("volume %s: its worker did not answer for its figures: %s", name, exc)

    async with trio.open_nursery() as nursery:
        for name, served in list(supervisor.served.items()):
            if names is not None and name not in names:
                continue
            found[name] = {"mounts": len(served.paths), "restarts": served.restarts}
            if served.worker is not None and served.worker.running:
                nursery.start_soon(ask, name)
    return found
