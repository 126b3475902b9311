"""FUSE requests per user operation on the volfs target, from the worker's own counters.

The daemon hands out each served volume's request counts (the `stats` request that `volfsd
stats` sends; the worker counts in `volfs.opstats`). Read just before and just after the timed
part of a workload, their difference divided by the workload's operations (transactions,
files, entries, I/Os) is what one user operation costs in requests, by kind. The worker's CPU
time (user + system, all its threads, from /proc) over the same window gives the server's CPU
per request. Both readings are outside the timed part, so counting costs the workload nothing.

Requests the kernel sends after the window closes (a RELEASE after close() returned, FORGETs
in batches) are not in it: the counts are a floor, off by a handful per workload.
"""

from __future__ import annotations

import contextlib
import os
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from targets import Target, VolfsTarget

from volfs import control, requests

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: Below this many clock ticks of CPU (10 ms each, usually) a per-request figure is noise.
MIN_CPU_TICKS = 10


@dataclass(frozen=True)
class Reading:
    """The served volume's counts at one moment, and its worker's CPU seconds."""

    pid: int | None
    ops: dict[str, int]
    cpu_s: float | None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process *pid* (every thread), from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None
    # utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def read(target: VolfsTarget) -> Reading:
    """The counts of the target's volume as its daemon reports them, and the worker's CPU."""
    found = control.call(target.run_dir, requests.StatsRequest([target.volume]), timeout=30)
    figures = found.get(target.volume, {})
    pid = target.worker_pid()
    return Reading(pid, dict(figures.get("ops", {})), cpu_seconds(pid) if pid else None)


class Window:
    """The requests a volfs worker served between `start` and `stop`; nothing elsewhere."""

    def __init__(self, target: Target | None) -> None:
        self.target = target if isinstance(target, VolfsTarget) else None
        self.before: Reading | None = None
        self.after: Reading | None = None

    def start(self) -> None:
        if self.target is not None:
            self.before = read(self.target)

    def stop(self) -> None:
        if self.target is not None:
            self.after = read(self.target)

    def per(self, operations: int, unit: str) -> dict[str, Any] | None:
        """The window's requests per operation, by kind; None off volfs, or if the worker
        changed in between (a remount starts a new worker, counting from zero)."""
        before, after = self.before, self.after
        if before is None or after is None or before.pid != after.pid or operations <= 0:
            return None
        kinds = {k: n - before.ops.get(k, 0) for k, n in after.ops.items()}
        kinds = {k: n for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]) if n > 0}
        total = sum(kinds.values())
        cpu = None
        if before.cpu_s is not None and after.cpu_s is not None:
            cpu = after.cpu_s - before.cpu_s
        return {
            "unit": unit,
            "operations": operations,
            "requests": total,
            "per_operation": total / operations,
            "by_kind": kinds,
            "by_kind_per_operation": {k: n / operations for k, n in kinds.items()},
            "worker_cpu_s": cpu,
            "cpu_us_per_request": (
                cpu / total * 1e6
                if cpu is not None and cpu * CLOCK_TICKS >= MIN_CPU_TICKS and total
                else None
            ),
            "cpu_resolution_s": 1 / CLOCK_TICKS,
        }


@contextlib.contextmanager
def counted(target: Target | None) -> Iterator[Window]:
    """Count the requests the body makes of *target* (volfs only; elsewhere a no-op)."""
    window = Window(target)
    window.start()
    yield window
    window.stop()


def summarize(runs: list[dict[str, Any]], target: str = "volfs") -> list[dict[str, Any]]:
    """Per workload of *target*, the median over repeats of requests per operation, of each
    kind's share and of CPU per request."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        if run["target"] == target and run.get("requests"):
            rows.setdefault(run["workload"], []).append(run["requests"])
    out = []
    for workload, counts in rows.items():
        kinds = {k for c in counts for k in c["by_kind_per_operation"]}
        per_kind = {
            k: statistics.median(c["by_kind_per_operation"].get(k, 0.0) for c in counts)
            for k in kinds
        }
        cpus = [c["cpu_us_per_request"] for c in counts if c["cpu_us_per_request"] is not None]
        out.append(
            {
                "workload": workload,
                "n": len(counts),
                "unit": counts[0]["unit"],
                "per_operation": statistics.median(c["per_operation"] for c in counts),
                "requests": statistics.median(c["requests"] for c in counts),
                "by_kind_per_operation": dict(sorted(per_kind.items(), key=lambda kv: -kv[1])),
                "cpu_us_per_request": statistics.median(cpus) if cpus else None,
            }
        )
    return out


def format_summary(rows: list[dict[str, Any]], shown: float = 0.05) -> str:
    """A line per workload: requests per operation, the kinds of at least *shown* per
    operation, and the worker's CPU per request."""
    if not rows:
        return ""
    width = max(len(r["workload"]) for r in rows)
    lines = ["volfs: FUSE requests per user operation (the worker's counters, median over "
             "repeats), worker CPU per request:"]  # fmt: skip
    for r in rows:
        kinds = ", ".join(
            f"{k} {v:.1f}" for k, v in r["by_kind_per_operation"].items() if v >= shown
        )
        # The kernel's caches answered nearly all: say how few reached the worker.
        kinds = kinds or f"{r['requests']:.0f} requests in all"
        cpu = r["cpu_us_per_request"]
        cpu_text = "" if cpu is None else f"; {cpu:.0f} us CPU/req"
        lines.append(
            f"  {r['workload']:<{width}}  {r['per_operation']:8.1f} req/{r['unit']}: "
            f"{kinds}{cpu_text}"
        )
    return "\n".join(lines)
