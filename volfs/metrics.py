"""The daemon's Prometheus endpoint: ``GET /metrics`` on ``--metrics ADDR`` (127.0.0.1:9567).

Each scrape asks every running worker for its counts once (`WorkerStatsRequest`, in parallel,
`volume_stats.gather`): requests are counted in the worker, never sent one by one.  The
figures are rendered by the maintained client library (prometheus-client) from a collector
that yields metric families with a ``volume`` label; no file names or contents appear.  A
worker that does not answer is left out of that scrape (and its volume's ``volfs_up`` is 0).
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Iterator
from typing import Any

import h11
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from volfs.control_server import serve_connections
from volfs.errors import ErrorCode, VolfsError
from volfs.http_serving import next_event, send_response
from volfs.store import headers
from volfs.supervisor import Supervisor
from volfs.volume_stats import gather

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = ("127.0.0.1", 9567)
REQUEST_TIMEOUT = 10.0


def address_of(text: str) -> tuple[str, int]:
    """(host, port) of a checked ``HOST:PORT`` (`config.parse_metrics_address`)."""
    host, _, port = text.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def listen(address: tuple[str, int]) -> socket.socket:
    """The metrics listener, bound before the daemon serves anything: an address in use is a
    clear error at start."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise VolfsError(
            f"cannot serve metrics on {address[0]}:{address[1]}: {exc.strerror}; choose "
            "another address with --metrics HOST:PORT (or --metrics off)",
            ErrorCode.BUSY if exc.errno == errno.EADDRINUSE else ErrorCode.INVALID,
        ) from None
    sock.listen(64)
    return sock


class _Gathered(Collector):
    """The figures of one scrape, as metric families."""

    def __init__(
        self, volumes: dict[str, dict[str, Any]], scrubs: dict[str, dict[str, Any]]
    ) -> None:
        self.volumes = volumes  #: the served volumes' figures (`volume_stats.gather`)
        self.scrubs = scrubs  #: the last scrub of each volume of the store that had one

    def collect(self) -> Iterator[Metric]:
        labels = ["volume"]
        up = GaugeMetricFamily("volfs_up", "Whether the volume's worker answered", labels=labels)
        mounts = GaugeMetricFamily("volfs_mounts", "Paths the volume is mounted at", labels=labels)
        restarts = CounterMetricFamily(
            "volfs_worker_restarts", "Times the volume's worker was restarted", labels=labels
        )
        ops = CounterMetricFamily("volfs_ops", "FUSE requests", labels=["volume", "op"])
        errors = CounterMetricFamily(
            "volfs_errors", "FUSE requests answered with an error", labels=["volume", "op", "errno"]
        )
        duration = HistogramMetricFamily(
            "volfs_op_duration_seconds", "Time to answer a FUSE request", labels=["volume", "op"]
        )
        counters = {
            key: CounterMetricFamily(f"volfs_{key}", text, labels=labels)
            for key, text in (
                ("bytes_read", "Bytes read through the mount"),
                ("bytes_written", "Bytes written through the mount"),
            )
        }
        damage = CounterMetricFamily(
            "volfs_damage_found", "Damage found: reads that met damaged data, and the problems "
            "scrubs found", labels=["volume", "found_by"],
        )  # fmt: skip
        flushes = HistogramMetricFamily(
            "volfs_fsync_duration_seconds", "Time the store took to make its log durable (for "
            "fsync, synchronous writes and checkpoints)", labels=labels,
        )  # fmt: skip
        gauges = {
            key: GaugeMetricFamily(f"volfs_{key}", text, labels=labels)
            for key, text in (
                ("used_bytes", "Bytes the volume holds (what its size limit counts)"),
                ("size_bytes", "The volume's size limit (0: none)"),
                ("inodes", "Inodes in use"),
                ("store_bytes", "Bytes of the volume's log on disk, garbage included"),
            )
        }
        checkpoints = SummaryMetricFamily(
            "volfs_checkpoint_duration_seconds", "Checkpoints written, and their time",
            labels=labels,
        )  # fmt: skip
        compaction = CounterMetricFamily(
            "volfs_compaction_bytes", "Live bytes compaction copied", labels=labels
        )
        for name, figures in sorted(self.volumes.items()):
            up.add_metric([name], 1 if "ops" in figures else 0)
            mounts.add_metric([name], figures["mounts"])
            restarts.add_metric([name], figures["restarts"])
            if "ops" not in figures:
                continue
            for op, count in sorted(figures["ops"].items()):
                ops.add_metric([name, op], count)
            for op, code, count in figures["errors"]:
                errors.add_metric([name, op, errno.errorcode.get(code, str(code))], count)
            for op, latency in sorted(figures["latency"].items()):
                duration.add_metric([name, op], *_histogram(figures["buckets"], latency))
            flushes.add_metric([name], *_histogram(figures["flush_buckets"], figures["flushes"]))
            for key, family in counters.items():
                family.add_metric([name], figures[key])
            damage.add_metric([name, "read"], figures["damage_found"])
            checkpoints.add_metric([name], figures.get("checkpoints", 0),
                                   figures.get("checkpoint_seconds", 0.0))  # fmt: skip
            compaction.add_metric([name], figures.get("compaction_bytes", 0))
            for key, wire in (("used_bytes", "used"), ("size_bytes", "size"),
                              ("inodes", "inodes"), ("store_bytes", "store_bytes")):  # fmt: skip
                gauges[key].add_metric([name], figures[wire])
        scrubbed = GaugeMetricFamily(
            "volfs_scrub_timestamp_seconds", "When the volume's last scrub ended", labels=labels
        )
        scrub_problems = GaugeMetricFamily(
            "volfs_scrub_problems", "Problems the last scrub found (volume and snapshots)",
            labels=labels,
        )  # fmt: skip
        for name, found in sorted(self.scrubs.items()):
            scrubbed.add_metric([name], found["at_ns"] / 1e9)
            scrub_problems.add_metric([name], found["problems"])
            damage.add_metric([name, "scrub"], found["found_total"])
        yield from (up, mounts, restarts, ops, errors, duration, flushes, checkpoints, compaction)
        yield from (*counters.values(), damage, *gauges.values(), scrubbed, scrub_problems)


def _histogram(bounds: list[float], counts: list[float]) -> tuple[list[tuple[str, int]], float]:
    """Buckets and sum as prometheus-client takes them, from [count per bucket (the last
    +Inf)..., sum of seconds] as `OpStats` keeps them."""
    cumulative, total = [], 0
    for bound, n in zip([*map(str, bounds), "+Inf"], counts[:-1], strict=True):
        total += int(n)
        cumulative.append((bound, total))
    return cumulative, counts[-1]


class MetricsServer:
    """Serves ``/metrics`` for the volumes *supervisor* serves."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    async def render(self) -> bytes:
        registry = CollectorRegistry(auto_describe=False)
        volumes = await gather(self.supervisor)
        scrubs = await trio.to_thread.run_sync(self._scrubs)
        registry.register(_Gathered(volumes, scrubs))
        return generate_latest(registry)

    def _scrubs(self) -> dict[str, dict[str, Any]]:
        root = self.supervisor.root
        found = {name: headers.read_scrubbed(root.path, name) for name in root.names()}
        return {name: figures for name, figures in found.items() if figures is not None}

    async def serve(self, listener: trio.socket.SocketType) -> None:
        await serve_connections(listener, self._serve_connection, "metrics")

    async def _serve_connection(self, conn: trio.socket.SocketType) -> None:
        stream = trio.SocketStream(conn)
        http = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                event = await next_event(stream, http)
                if not isinstance(event, h11.Request):
                    return
                path = event.target.split(b"?")[0]
                if event.method not in (b"GET", b"HEAD"):
                    await send_response(stream, http, 405, "text/plain", b"GET /metrics\n")
                elif path != b"/metrics":
                    await send_response(stream, http, 404, "text/plain", b"see /metrics\n")
                else:
                    body = await self.render()
                    await send_response(stream, http, 200, CONTENT_TYPE_LATEST, body)
        except (OSError, h11.ProtocolError, trio.BrokenResourceError, trio.TooSlowError):
            pass  # the scraper went away, was too slow, or spoke no HTTP
        except Exception:
            log.exception("metrics: a scrape failed")
        finally:
            await stream.aclose()
