"""Scheduled scrubs: `scrub_every` in the config makes the daemon scrub each volume in the
background; the result shows in `status` (issue 14, item 5)."""

from __future__ import annotations

import os

import pytest
from test_damage import _flip, _pattern
from test_metrics import _free_port, _scrape, _value
from test_scrub import BLOCK, find_once

from volfs.config import parse_duration
from volfs.errors import VolfsError

from helpers import wait_until


def test_volumes_are_scrubbed_when_due(host, tmp_path):
    config = tmp_path / "volumes.toml"
    config.write_text(
        'scrub_every = "2s"\n'
        f'[volumes.often]\npaths = ["{tmp_path / "often"}"]\n'
        f'[volumes.never]\npaths = ["{tmp_path / "never"}"]\nscrub_every = "off"\n'
    )
    os.chmod(config, 0o600)
    host.serve("--config", str(config))
    # The daemon answers before its declared volumes are mounted: wait for them.
    wait_until(lambda: {n: v["status"] for n, v in host.status()["by_name"].items()}
               == {"often": "mounted", "never": "mounted"}, "the declared mounts")  # fmt: skip
    (tmp_path / "often" / "f").write_bytes(b"data" * 1000)

    def scrubbed() -> dict | None:
        return host.status()["by_name"]["often"]["last_scrub"]

    wait_until(scrubbed, "a scheduled scrub", timeout=60)
    first = scrubbed()
    assert first["problems"] == 0
    wait_until(lambda: scrubbed()["at_ns"] > first["at_ns"], "the next one", timeout=60)
    assert host.status()["by_name"]["never"]["last_scrub"] is None
    host.cli("umount", "--all")


@pytest.mark.store_damaged("a data byte flipped on purpose")
@pytest.mark.expect_log("scheduled scrub of volume hurt: ")
def test_scheduled_scrub_names_damage_in_the_log_status_and_metrics(host, tmp_path):
    """Damage a scheduled scrub finds: a log line per problem naming the file and the bytes,
    the count in `status`, and in the metrics (the last scrub's problems; the damage counter
    grows with every scrub that finds it again)."""
    config = tmp_path / "volumes.toml"
    config.write_text(f'scrub_every = "2s"\n[volumes.hurt]\npaths = ["{tmp_path / "hurt"}"]\n')
    os.chmod(config, 0o600)
    port = _free_port()
    host.serve("--config", str(config), "--metrics", f"127.0.0.1:{port}")
    wait_until(lambda: host.status()["by_name"].get("hurt", {}).get("status") == "mounted",
               "the declared mount")  # fmt: skip
    data = _pattern(256 * 1024)
    with open(tmp_path / "hurt" / "victim", "wb") as out:
        out.write(data)
        os.fsync(out.fileno())
    at = 100 * 1024 + 3
    _flip(*find_once(host.root / "volumes" / "hurt", data[at : at + 64]))

    def found() -> int:
        last = host.status()["by_name"]["hurt"]["last_scrub"]
        return 0 if last is None else last["problems"]

    wait_until(found, "a scheduled scrub that finds the damage", timeout=60)
    lo = at // BLOCK * BLOCK
    log = (host.root / "logs" / "volfsd.log").read_text()
    assert (f"scheduled scrub of volume hurt: in hurt: /victim: damaged data in bytes {lo}-"
            f"{lo + BLOCK} (inode ") in log  # fmt: skip
    first = _scrape(port)
    assert _value(first, "volfs_scrub_problems", volume="hurt") == 1
    assert _value(first, "volfs_scrub_timestamp_seconds", volume="hurt") > 0
    counted = _value(first, "volfs_damage_found_total", volume="hurt", found_by="scrub")
    assert counted >= 1
    wait_until(lambda: _value(_scrape(port), "volfs_damage_found_total", volume="hurt",
                              found_by="scrub") > counted, "the next scrub counted")  # fmt: skip
    host.cli("umount", "--all")


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800), ("off", 0)]
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["7", "1w", "0d", "-1h", "1.5h", "", 7])
def test_bad_durations(text):
    with pytest.raises(VolfsError, match="invalid duration"):
        parse_duration(text)
