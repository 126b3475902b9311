"""Scheduled scrubs: the daemon scrubs each volume of its store in the background, every
``scrub_every`` (config key, top level; a ``[volumes.NAME]`` key of the same name overrides it
for that volume), at the scrub's rate limit.

A volume is due when its last scrub (`headers.read_scrubbed`, whoever ran it) is older than
its interval; one is scrubbed at a time, in a thread (a scrub reads the store directly and
takes no lock, as `volfsd scrub` does), and what it found shows in `status`, `inspect` and the
log (an error line naming where damage was found).
"""

from __future__ import annotations

import logging
import time

import trio

from volfs import checking
from volfs.config import DaemonConfig
from volfs.errors import VolfsError
from volfs.store import headers
from volfs.store.root import StoreRoot

log = logging.getLogger(__name__)

#: How often the schedule looks for a volume that is due (shorter for shorter intervals).
LOOK_EVERY = 60.0


def interval(config: DaemonConfig, name: str) -> float:
    """Seconds between scrubs of volume *name* (0: never)."""
    declared = config.volumes.get(name)
    if declared is not None and declared.scrub_every is not None:
        return declared.scrub_every
    return config.scrub_every or 0.0


async def scrub_forever(root: StoreRoot, config: DaemonConfig) -> None:
    """Scrub each volume when it is due, one at a time, until cancelled."""
    intervals = [config.scrub_every or 0] + [v.scrub_every or 0 for v in config.volumes.values()]
    shortest = min((i for i in intervals if i), default=0)
    if not shortest:
        return
    while True:
        for name in root.names():
            every = interval(config, name)
            found = headers.read_scrubbed(root.path, name)
            last = None if found is None else found["at_ns"]
            if not every or (last is not None and time.time_ns() - last < every * 1e9):
                continue
            try:
                damaged = await trio.to_thread.run_sync(checking.scrub_quietly, root.path, name)
            except (VolfsError, OSError) as exc:
                log.warning("scheduled scrub of volume %s: not checked: %s", name, exc,
                            extra={"volume": name})  # fmt: skip
                continue
            if damaged:
                where = ", ".join(damaged)
                log.error("scheduled scrub of volume %s: damage found in %s; run "
                          "`volfsd scrub %s` to see where", name, where, name,
                          extra={"volume": name})  # fmt: skip
            else:
                log.info("scheduled scrub of volume %s: clean", name, extra={"volume": name})
        await trio.sleep(min(LOOK_EVERY, max(1.0, shortest / 2)))
