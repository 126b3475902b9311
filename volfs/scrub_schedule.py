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
#: Problems of one scheduled scrub logged one by one; the rest are counted in one line.
MAX_LOGGED = 20


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
            before = headers.read_scrubbed(root.path, name)
            last = None if before is None else before["at_ns"]
            if not every or (last is not None and time.time_ns() - last < every * 1e9):
                continue
            try:
                found = await trio.to_thread.run_sync(checking.scrub_quietly, root.path, name)
            except (VolfsError, OSError) as exc:
                log.warning("scheduled scrub of volume %s: not checked: %s", name, exc,
                            extra={"volume": name})  # fmt: skip
                continue
            _log_findings(name, found)
        await trio.sleep(min(LOOK_EVERY, max(1.0, shortest / 2)))


def _log_findings(name: str, found: list[checking.Finding]) -> None:
    """A line per problem a scrub of volume *name* found (the first `MAX_LOGGED`), each
    naming the volume or snapshot, the file and what is wrong (for data: the bytes)."""
    volume = {"volume": name}
    if not found:
        log.info("scheduled scrub of volume %s: clean", name, extra=volume)
        return
    for label, problem in found[:MAX_LOGGED]:
        fields = volume if problem.ino is None else {**volume, "inode": problem.ino}
        log.error("scheduled scrub of volume %s: in %s: %s: %s", name, label, problem.path,
                  problem.what, extra=fields)  # fmt: skip
    more = f" ({len(found) - MAX_LOGGED} more not logged)" if len(found) > MAX_LOGGED else ""
    log.error("scheduled scrub of volume %s: %d problem(s) found%s; `volfsd scrub %s` lists "
              "them all", name, len(found), more, name, extra=volume)  # fmt: skip
