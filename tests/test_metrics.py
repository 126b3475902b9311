"""Prometheus metrics of `volfsd serve --metrics`: scraped after known work, parsed by the
client library's own parser (issue 14, item 1)."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import VOLFSD, assert_one_line_error, wait_until


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Every sample of a scrape: (name, labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.mark.expect_log(r"its worker exited \(pid \d+, ")
def test_counters_follow_a_known_workload(host, tmp_path):
    port = _free_port()
    host.serve("--metrics", f"127.0.0.1:{port}")
    mnt = tmp_path / "m"
    host.cli("mount", "busy", str(mnt), "--size", "1M")
    before = _scrape(port)
    writes = 50
    with open(mnt / "f", "wb", buffering=0) as out:
        for _ in range(writes):
            out.write(b"x" * 4096)
        os.fsync(out.fileno())
        # What it wrote stays in the page cache (AUTO_INVAL_DATA is off): drop it, so the
        # reads below reach the worker.
        os.posix_fadvise(out.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    assert (mnt / "f").read_bytes() == b"x" * 4096 * writes
    with pytest.raises(FileNotFoundError):
        (mnt / "missing").stat()
    with pytest.raises(OSError) as full, open(mnt / "big", "wb", buffering=0) as out:
        out.write(b"y" * (2 << 20))
    assert full.value.errno == errno.ENOSPC
    after = _scrape(port)
    grew = {
        op: _value(after, "volfs_ops_total", volume="busy", op=op)
        - _value(before, "volfs_ops_total", volume="busy", op=op)
        for op in ("write", "fsync", "lookup", "read")
    }
    assert grew["write"] >= writes and grew["fsync"] >= 1 and grew["lookup"] >= 1, grew
    assert _value(after, "volfs_bytes_written_total", volume="busy") >= writes * 4096
    assert _value(after, "volfs_bytes_read_total", volume="busy") >= writes * 4096
    assert _value(after, "volfs_errors_total", volume="busy", op="write", errno="ENOSPC") >= 1
    # (A lookup of a missing name is a negative entry, which the kernel caches: no error.)
    assert _value(after, "volfs_op_duration_seconds_count", volume="busy", op="write") >= writes
    # The fsync flushed the log: the store's own flush time is kept apart from the request's.
    flushed = ("volfs_fsync_duration_seconds_count", frozenset({("volume", "busy")}))
    assert after[flushed] > before.get(flushed, 0)
    assert _value(after, "volfs_damage_found_total", volume="busy", found_by="read") == 0
    assert _value(after, "volfs_size_bytes", volume="busy") == 1 << 20
    assert _value(after, "volfs_used_bytes", volume="busy") >= writes * 4096
    assert _value(after, "volfs_store_bytes", volume="busy") >= writes * 4096
    assert _value(after, "volfs_mounts", volume="busy") == 1
    assert _value(after, "volfs_up", volume="busy") == 1
    assert ("volfs_checkpoint_duration_seconds_count", frozenset({("volume", "busy")})) in after
    assert ("volfs_compaction_bytes_total", frozenset({("volume", "busy")})) in after
    series = [key for key in after if ("volume", "busy") in key[1]]
    assert len(series) <= 120, f"{len(series)} series for one volume"
    # No file names in the metrics (only volume names, operations and errnos).
    assert not [key for key in after if any("missing" in v or "big" in v for _, v in key[1])]

    worker = host.worker_pid("busy")
    os.kill(worker, signal.SIGKILL)
    wait_until(
        lambda: (
            _value(_scrape(port), "volfs_worker_restarts_total", volume="busy") == 1
            and _value(_scrape(port), "volfs_up", volume="busy") == 1
        ),
        "the restart counted",
        timeout=60,
    )
    host.cli("umount", str(mnt))


def test_an_address_in_use_is_refused_at_start(host):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = subprocess.run([*VOLFSD, "serve", "--metrics", f"127.0.0.1:{port}"],
                              env=host.env, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert_one_line_error(done, f"127.0.0.1:{port}", "--metrics")
    done = subprocess.run([*VOLFSD, "serve", "--metrics", "nowhere"], env=host.env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert_one_line_error(done, "invalid metrics address")


def test_other_paths_and_methods(host):
    port = _free_port()
    host.serve("--metrics", f"127.0.0.1:{port}")
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
    assert missing.value.code == 404
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", data=b"x")
    with pytest.raises(urllib.error.HTTPError) as posted:
        urllib.request.urlopen(request, timeout=10)
    assert posted.value.code == 405
    assert _scrape(port) == {}  # nothing served yet: no series
