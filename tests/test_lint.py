"""The code stays ruff-clean and ruff-formatted (the configuration is in pyproject.toml), and
the README names what install.sh installs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parent.parent


def _ruff() -> list[str]:
    local = Path(sys.executable).with_name("ruff")
    if local.exists():
        return [str(local)]
    if shutil.which("ruff"):
        return ["ruff"]
    pytest.skip("ruff is not installed (pip install -e '.[test]')")


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]])
def test_ruff(args):
    done = subprocess.run([*_ruff(), *args, "."], cwd=TOP, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_readme_names_every_package_install_sh_installs():
    """The README's set-up and test sections name each system package install.sh installs."""
    script = (TOP / "install.sh").read_text()
    readme = (TOP / "README.md").read_text()
    packages = re.search(r"^packages=\((.*)\)$", script, re.M)[1].split()
    packages += re.search(r"packages\+=\((.*)\)", script)[1].split()
    prose = re.sub(r"^```.*?^```", "", readme, flags=re.M | re.S)  # code blocks are not names
    named = set(re.findall(r"`([^`]+)`", prose))
    named = {word for phrase in named for word in phrase.split()}
    assert [p for p in packages if p not in named] == []


def test_mypy():
    """The package type-checks (pyproject's [tool.mypy]: strict for volfs.store)."""
    local = Path(sys.executable).with_name("mypy")
    assert local.exists(), "mypy is not installed: ./install.sh --dev"
    done = subprocess.run([str(local)], cwd=TOP, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
