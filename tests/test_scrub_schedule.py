"""Scheduled scrubs: `scrub_every` in the config makes the daemon scrub each volume in the
background; the result shows in `status` (issue 14, item 5)."""

from __future__ import annotations

import os

import pytest

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


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800), ("off", 0)]
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["7", "1w", "0d", "-1h", "1.5h", "", 7])
def test_bad_durations(text):
    with pytest.raises(VolfsError, match="invalid duration"):
        parse_duration(text)
