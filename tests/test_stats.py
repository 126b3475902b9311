"""`volfsd stats`: live lines per volume from the daemon's figures (issue 14, item 2)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from volfs import cli_stats
from volfs.opstats import OpStats


def test_a_line_per_interval_per_volume(host, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    host.cli("mount", "alpha", str(a))
    host.cli("mount", "beta", str(b))
    writer = textwrap.dedent(
        f"""
        import os, time
        end = time.monotonic() + 4
        i = 0
        while time.monotonic() < end:
            with open("{a}/f%d" % i, "wb") as f:
                f.write(b"x" * 65536)
                os.fsync(f.fileno())
            i += 1
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", writer])
    try:
        out = host.cli("stats", "--interval", "0.5", "--count", "3").stdout.splitlines()
    finally:
        proc.wait(timeout=60)
    assert out[0].split()[:3] == ["TIME", "VOLUME", "OPS/S"]
    rows = [line.split() for line in out[1:]]
    assert len(rows) == 6 and {r[1] for r in rows} == {"alpha", "beta"}
    busy = [r for r in rows if r[1] == "alpha"]
    header = out[0].split()
    assert all(int(r[header.index("WRITE")]) > 0 for r in busy), out
    assert all(float(r[header.index("WR_MB/S")]) > 0 for r in busy), out
    assert all(r[header.index("ERRORS")] == "0" for r in rows), out
    only = host.cli("stats", "beta", "--interval", "0.2", "--count", "1").stdout.splitlines()
    assert len(only) == 2 and only[1].split()[1] == "beta"
    host.refused("stats", "gamma", "--count", "1", words=("not mounted",))
    host.refused("stats", "--interval", "0", words=("positive",))
    host.cli("umount", "--all")


def test_rates_and_percentiles_from_two_snapshots():
    stats = OpStats()
    old = {**stats.snapshot(), "restarts": 0}
    for _ in range(98):
        stats.done("write", 0.0001)
    stats.done("write", 0.01)
    stats.done("fsync", 0.2)
    stats.bytes_written = 4_000_000
    stats.failed("write", 28)  # ENOSPC counts
    stats.failed("getxattr", 61)  # ENODATA does not: an answer
    new = {**stats.snapshot(), "restarts": 0}
    row = cli_stats.line("v", old, new, 2.0)
    header = cli_stats.HEADER
    assert row[header.index("OPS/S")] == "50" and row[header.index("WRITE")] == "50"
    assert row[header.index("WR_MB/S")] == "2.0"
    assert row[header.index("P50")] == "<0.5ms" and row[header.index("P99")] == "<50ms"
    assert row[header.index("ERRORS")] == "1"
    # A restarted worker counts from zero: its line is not a negative difference.
    assert cli_stats.line("v", new, {**new, "restarts": 1}, 1.0)[2] == "100"
    assert cli_stats.percentile([0, 0, 0, 0, 0], 0.5) == "-"
