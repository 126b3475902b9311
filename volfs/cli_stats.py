"""``volfsd stats [NAME...] [--interval S] [--count N]``: live figures, a line per volume per
interval, as `vmstat` prints them.

Each interval asks the daemon for the served volumes' counts (`StatsRequest`, the same figures
the metrics endpoint serves, so it works with metrics off) and prints the difference: requests
per second of the main kinds, MB/s read and written, the 50th and 99th percentile latency (by
the histogram's buckets: "<0.5ms" means under half a millisecond), and errors (not counting
ENOENT and ENODATA, which are answers: the metrics have every errno).
"""

from __future__ import annotations

import argparse
import errno
import time
from typing import Any

from volfs import control, requests
from volfs.cli_base import CliError, Parser, call
from volfs.errors import ErrorCode
from volfs.opstats import BUCKETS, TIMED

KINDS = ("lookup", "getattr", "read", "write", "create", "unlink", "fsync")
HEADER = ["TIME", "VOLUME", "OPS/S", *(k.upper() for k in KINDS), "RD_MB/S", "WR_MB/S",
          "P50", "P99", "ERRORS"]  # fmt: skip


def _latency_sums(figures: dict[str, Any]) -> list[float]:
    """The bucket counts of every timed kind added up (the last, +Inf, included)."""
    total = [0.0] * (len(BUCKETS) + 1)
    for op in TIMED:
        for i, n in enumerate(figures.get("latency", {}).get(op, [])[:-1]):
            total[i] += n
    return total


def percentile(buckets: list[float], fraction: float) -> str:
    """The bucket bound under which *fraction* of the requests in *buckets* were answered."""
    count = sum(buckets)
    if not count:
        return "-"
    seen = 0.0
    for bound, n in zip(BUCKETS, buckets, strict=False):
        seen += n
        if seen >= fraction * count:
            return f"<{bound * 1000:g}ms"
    return f">{BUCKETS[-1] * 1000:g}ms"


#: Answers that are errnos but no failures: a missing xattr (asked before every write) or name.
_EXPECTED = frozenset({errno.ENODATA, errno.ENOENT})


def _failures(figures: dict[str, Any]) -> int:
    return sum(n for _, code, n in figures.get("errors", []) if code not in _EXPECTED)


def line(name: str, old: dict[str, Any], new: dict[str, Any], seconds: float) -> list[str]:
    """The row of volume *name* for the interval from *old* to *new* figures."""
    if "ops" not in new:
        return [time.strftime("%H:%M:%S"), name, "-", *("-" for _ in KINDS), "-", "-", "-", "-",
                "no answer"]  # fmt: skip
    if new.get("restarts") != old.get("restarts") or "ops" not in old:
        old = {}  # a new worker counts from zero

    def rate(value: float) -> str:
        return f"{value / seconds:.0f}"

    ops_old, ops_new = old.get("ops", {}), new["ops"]
    total = sum(ops_new.values()) - sum(ops_old.values())
    kinds = [rate(ops_new.get(k, 0) - ops_old.get(k, 0)) for k in KINDS]
    read = (new["bytes_read"] - old.get("bytes_read", 0)) / seconds / 1e6
    written = (new["bytes_written"] - old.get("bytes_written", 0)) / seconds / 1e6
    buckets = [a - b for a, b in zip(_latency_sums(new), _latency_sums(old), strict=True)]
    errors = _failures(new) - _failures(old)
    return [time.strftime("%H:%M:%S"), name, rate(total), *kinds, f"{read:.1f}", f"{written:.1f}",
            percentile(buckets, 0.5), percentile(buckets, 0.99), str(errors)]  # fmt: skip


def _figures(names: list[str]) -> dict[str, dict[str, Any]]:
    try:
        found: dict[str, dict[str, Any]] = call(requests.StatsRequest(names))
    except control.DaemonNotRunning:
        raise CliError(
            "volfsd is not running: stats shows the volumes a daemon serves", ErrorCode.UNAVAILABLE
        ) from None
    missing = [n for n in names if n not in found]
    if missing:
        raise CliError(f"volume {missing[0]} is not mounted: nothing to show", ErrorCode.NOT_FOUND)
    return found


def cmd_stats(args: argparse.Namespace) -> None:
    if args.interval <= 0 or (args.count is not None and args.count <= 0):
        raise CliError("--interval and --count must be positive")
    old, then = _figures(args.names), time.monotonic()
    widths = [max(len(h), 8) for h in HEADER]
    widths[1] = max(16, *(len(n) for n in old))
    print("  ".join(h.ljust(w) for h, w in zip(HEADER, widths, strict=True)).rstrip(), flush=True)
    done = 0
    while args.count is None or done < args.count:
        time.sleep(args.interval)
        new, now = _figures(args.names), time.monotonic()
        for name in sorted(new):
            row = line(name, old.get(name, {}), new[name], now - then)
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(),
                  flush=True)  # fmt: skip
        old, then = new, now
        done += 1


def _positive(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    stats = sub.add_parser("stats", help="live request rates, throughput and latency per volume")
    stats.add_argument("names", nargs="*", metavar="NAME", help="volumes (default: all served)")
    stats.add_argument("--interval", type=_positive, default=1.0, metavar="S",
                       help="seconds between lines (default 1)")  # fmt: skip
    stats.add_argument("--count", type=int, metavar="N", help="lines per volume, then stop")
    stats.set_defaults(func=cmd_stats)
