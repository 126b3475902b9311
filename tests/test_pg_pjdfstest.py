"""pjdfstest, the POSIX conformance suite, on a volume of the PostgreSQL engine (slow: about
5 minutes here; ``pytest -m slow tests/test_pg_pjdfstest.py``).

Built from ../shared/suites as tests/pjdfstest.sh builds it (autoconf automake gcc make perl
libssl-dev), run with ``prove -r`` in a directory of a mount served from the engine (tests/pg.py),
passed when prove says ``Result: PASS`` and the worker logged no error (`pg_hosts` checks that
and the volume's rows at the end)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from volfs.pg.schema import create_volume

pytest_plugins = ["pg"]  # its fixtures: pg_server, pg_url, pg_hosts

TARBALL = Path(__file__).resolve().parents[2] / "shared" / "suites" / "pjdfstest-85a8aea.tar.gz"


@pytest.mark.slow
def test_pjdfstest_passes_on_a_pg_volume(pg_url, pg_hosts, tmp_path):
    if not TARBALL.is_file():
        pytest.skip(f"no pjdfstest tarball at {TARBALL}")
    missing = [tool for tool in ("autoreconf", "make", "gcc", "prove") if not shutil.which(tool)]
    if missing:
        pytest.skip(f"pjdfstest's build needs {' '.join(missing)}")
    subprocess.run(["tar", "-xzf", str(TARBALL), "-C", str(tmp_path)], check=True)
    source = tmp_path / "pjdfstest"
    build = subprocess.run("autoreconf -ifs && ./configure && make pjdfstest", shell=True,
                           cwd=source, capture_output=True, text=True)  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    create_volume(pg_url, "pjd")
    host = pg_hosts("pjd")
    work = host.mountpoint / "pjd"
    work.mkdir()
    done = subprocess.run(["prove", "-r", str(source / "tests")], cwd=work,
                          capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert "Result: PASS" in done.stdout, done.stdout[-5000:] + done.stderr[-2000:]
