"""bench/run.py in smoke mode, so the benchmark never rots.  No timing is asserted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "run.py"


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed (install.sh --dev)")
def test_bench_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--targets", "native,volfs",
         "--workdir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert "volfs" in done.stdout and "ratio" in done.stdout
    assert results, "no results written"
