"""What a worker counts of the requests it serves: operations, errors, latencies, bytes.

Kept in the worker's memory as plain integers (a few list and dict updates per request, no
lock: the worker's handlers run on one thread), and handed to the daemon as one snapshot per
scrape over the worker's control socket (`WorkerStatsRequest`), so no request costs a round
trip.  The counts live as long as the worker: a daemon restart (a hand-off) keeps them, a
worker restart starts them at zero (Prometheus reads that as a counter reset), and the daemon
counts restarts itself.

The series are bounded: one count per FUSE operation, a latency histogram for the main kinds
only (`TIMED`), errors by operation and errno (the errnos a file system answers are few).
"""

from __future__ import annotations

import bisect
from typing import Any

#: The operations whose latency is kept as a histogram; the others are counted only.
TIMED = ("lookup", "getattr", "read", "write", "create", "unlink", "rename", "fsync")
#: Upper bounds of the latency buckets, in seconds (the last, +Inf, is implied): few, so that
#: a volume stays within tens of series (a FUSE request takes 30 us to a few ms; fsync more).
BUCKETS = (0.0005, 0.005, 0.05, 0.5)
#: Upper bounds of the buckets of the store's flushes (an fdatasync takes 1 to 100 ms).
FLUSH_BUCKETS = (0.002, 0.01, 0.05, 0.25)


class OpStats:
    """The counts of one worker's requests since it started."""

    def __init__(self) -> None:
        self.ops: dict[str, int] = {}
        self.errors: dict[tuple[str, int], int] = {}
        self.bytes_read = 0
        self.bytes_written = 0
        self.damage_found = 0
        self.sync_writes = 0  #: writes made durable as they returned (O_DSYNC, O_SYNC)
        #: Lock requests that began to wait (F_SETLKW, flock without LOCK_NB, refused at
        #: first), and how often they tried again on a release they heard of and after
        #: `volfs.fsops.LOCK_RECHECK` without one.
        self.lock_waits = 0
        self.lock_wakeups = 0
        self.lock_rechecks = 0
        #: op -> [count per bucket (the last one +Inf)..., sum of seconds]
        self._latency: dict[str, list[float]] = {op: [0] * (len(BUCKETS) + 2) for op in TIMED}
        #: The store's flushes of its log (fsync, fsyncdir, synchronous writes, checkpoints)
        #: as [count per bucket..., sum of seconds]: what the disk costs, apart from the rest.
        self._flushes: list[float] = [0] * (len(FLUSH_BUCKETS) + 2)

    def done(self, op: str, seconds: float) -> None:
        """Count one request of *op* that took *seconds*."""
        self.ops[op] = self.ops.get(op, 0) + 1
        latency = self._latency.get(op)
        if latency is not None:
            _add(latency, BUCKETS, seconds)

    def flushed(self, seconds: float) -> None:
        """Count one flush of the store's log that took *seconds* (`SegmentLog.on_flush`)."""
        _add(self._flushes, FLUSH_BUCKETS, seconds)

    def failed(self, op: str, errno: int) -> None:
        key = (op, errno)
        self.errors[key] = self.errors.get(key, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """The counts as the control protocol carries them (string keys, lists)."""
        return {
            "ops": dict(self.ops),
            "errors": [[op, code, n] for (op, code), n in self.errors.items()],
            "latency": {op: list(v) for op, v in self._latency.items() if sum(v[:-1])},
            "buckets": list(BUCKETS),
            "flushes": list(self._flushes),
            "flush_buckets": list(FLUSH_BUCKETS),
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "damage_found": self.damage_found,
            "sync_writes": self.sync_writes,
            "lock_waits": self.lock_waits,
            "lock_wakeups": self.lock_wakeups,
            "lock_rechecks": self.lock_rechecks,
        }


def _add(histogram: list[float], bounds: tuple[float, ...], seconds: float) -> None:
    """Count *seconds* in *histogram*: [count per bucket of *bounds*, +Inf..., sum]."""
    histogram[bisect.bisect_left(bounds, seconds)] += 1
    histogram[-1] += seconds
