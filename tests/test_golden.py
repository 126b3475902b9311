"""Stores written by every earlier format version still mount, read byte-exact and check clean.

Each ``tests/data/golden-vN/`` was written by ``tests/data/make_golden_vN.py`` with the volfs of
format N (a checkpoint, then a log tail after it, with every record kind) and holds the store
and a manifest of what the volume showed. A format change keeps every one of them passing, or
migrates it explicitly and says so in CHANGELOG.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

from volfs.store.root import STORE_FORMAT

from helpers import needs_root, volfsd

DATA = Path(__file__).resolve().parent / "data"
GOLDEN = sorted(DATA.glob("golden-v*"))


def _manifest_of(top: Path) -> list[dict[str, object]]:
    """What the volume mounted at *top* shows, as make_golden_v1 describes it."""
    spec = importlib.util.spec_from_file_location("make_golden_v1", DATA / "make_golden_v1.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.manifest(top)


def _copy_store(golden: Path, root: Path) -> None:
    """The golden store at *root*, with the modes a store has (git keeps 0644 and 0755)."""
    shutil.copytree(golden / "store", root)
    for path in [root, *root.rglob("*")]:
        os.chmod(path, 0o700 if path.is_dir() else 0o600)


def _same(listing: list[dict[str, object]], want: list[dict[str, object]]) -> None:
    assert [e["path"] for e in listing] == [e["path"] for e in want]
    for got, expected in zip(listing, want, strict=True):
        assert got == expected, got["path"]


def test_there_is_a_golden_store_per_format_version():
    assert [p.name for p in GOLDEN] == [f"golden-v{n}" for n in range(1, STORE_FORMAT + 1)]


@needs_root("the volume holds a device node, owned by other uids")
@pytest.mark.parametrize("golden", GOLDEN, ids=lambda p: p.name)
def test_golden_store_mounts_reads_exact_and_checks_clean(golden: Path, store_root: Path, tmp_path):
    want = json.loads((golden / "manifest.json").read_text())
    _copy_store(golden, store_root)
    for name in sorted(p.name for p in (store_root / "volumes").iterdir()):
        assert volfsd("fsck", name, root=store_root).returncode == 0
        for round in range(2):  # the second mount reads what today's unmount wrote
            mnt = tmp_path / f"{name}-{round}"
            volfsd("mount", name, str(mnt), root=store_root)
            try:
                _same(_manifest_of(mnt), want)
            finally:
                volfsd("umount", str(mnt), root=store_root)
            assert volfsd("fsck", name, root=store_root).returncode == 0
