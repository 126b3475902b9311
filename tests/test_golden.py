"""Stores written by every earlier format version still mount, read byte-exact and check clean.

Each ``tests/data/golden-vN/`` was written by ``tests/data/make_golden_vN.py`` with the volfs of
format N (a checkpoint, then a log tail after it, with every record kind) and holds the store
and a manifest of what the volume showed. A format change keeps every one of them passing, or
migrates it explicitly and says so in CHANGELOG.md. From format 2 on a store has history
(snapshots, a clone sharing segments by hard links): it is kept as ``store.tar``, since git
keeps no hard links, and its manifest has a listing per volume and per snapshot.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from volfs.store import check, history, records
from volfs.store.root import StoreRoot

from helpers import needs_root, volfsd

DATA = Path(__file__).resolve().parent / "data"
GOLDEN = sorted(DATA.glob("golden-v*"))
#: Golden stores of one volume (format 1), kept as a directory.
FLAT = [p for p in GOLDEN if (p / "store").is_dir()]
#: Golden stores with history (format 2 on), kept as a tar.
WITH_HISTORY = [p for p in GOLDEN if (p / "store.tar").is_file()]


def _script(golden: Path) -> ModuleType:
    """The make_golden_vN.py that wrote *golden*, imported."""
    name = f"make_{golden.name.replace('-', '_')}"
    spec = importlib.util.spec_from_file_location(name, DATA / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _manifest_of(top: Path) -> list[dict[str, object]]:
    """What the volume mounted at *top* shows, as make_golden_v1 describes it."""
    return _script(DATA / "golden-v1").manifest(top)


def _copy_store(golden: Path, root: Path) -> None:
    """The golden store at *root*, with the modes a store has (git keeps 0644 and 0755)."""
    shutil.copytree(golden / "store", root)
    for path in [root, *root.rglob("*")]:
        os.chmod(path, 0o700 if path.is_dir() else 0o600)


def _extract_store(golden: Path, root: Path) -> None:
    """The golden store of *golden*'s ``store.tar`` at *root*: tar keeps its hard links, owners
    and modes (shutil.copytree would copy each link as a file of its own)."""
    root.mkdir(mode=0o700)
    subprocess.run(["tar", "-xpf", str(golden / "store.tar"), "-C", str(root)], check=True)


def _same(listing: list[dict[str, object]], want: list[dict[str, object]]) -> None:
    assert [e["path"] for e in listing] == [e["path"] for e in want]
    for got, expected in zip(listing, want, strict=True):
        assert got == expected, got["path"]


def test_there_is_a_golden_store_per_format_version():
    """Named by the volume format (records.FORMAT); the store root's FORMAT is still 1."""
    assert [p.name for p in GOLDEN] == [f"golden-v{n}" for n in range(1, records.FORMAT + 1)]
    assert sorted(FLAT + WITH_HISTORY) == GOLDEN


@needs_root("the volume holds a device node, owned by other uids")
@pytest.mark.parametrize("golden", FLAT, ids=lambda p: p.name)
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


def _snapshot_shows(root: Path, label: str, want: list[dict[str, object]], script: ModuleType):
    """Snapshot *label* (NAME@SNAP) loads read-only, checks clean and shows *want*."""
    name, _, snap = label.partition("@")
    state, held = history.load(StoreRoot(root), name, snap)
    try:
        assert check.check(state) == [], label
        _same(script.state_manifest(state), want)
    finally:
        state.close()
        os.close(held)


@needs_root("the volumes hold a device node, owned by other uids")
@pytest.mark.parametrize("golden", WITH_HISTORY, ids=lambda p: p.name)
def test_golden_history_mounts_loads_exact_and_checks_clean(
    golden: Path, store_root: Path, tmp_path: Path
):
    """The volume and its clone mount side by side (sharing segments), each snapshot mounts
    read-only beside them and loads read-only, and all show their manifests; all again after
    today's unmounts."""
    want = json.loads((golden / "manifest.json").read_text())
    script = _script(golden)
    _extract_store(golden, store_root)
    shared = [p for p in store_root.rglob("seg-*.log") if p.stat().st_nlink > 1]
    assert shared, "the extracted store lost its hard links"
    volumes = [label for label in want if "@" not in label]
    assert len(volumes) >= 2 and len(want) > len(volumes)
    for name in volumes:
        assert volfsd("fsck", name, root=store_root).returncode == 0
    for round in range(2):  # the second reads what today's unmounts wrote
        mounted = []
        try:
            for label in [*volumes, *sorted(want.keys() - volumes)]:  # volumes first
                mnt = tmp_path / f"{label}-{round}"
                volfsd("mount", label, str(mnt), root=store_root)
                mounted.append(mnt)
                _same(_manifest_of(mnt), want[label])
            for label in sorted(want.keys() - volumes):
                _snapshot_shows(store_root, label, want[label], script)
        finally:
            for mnt in mounted:
                volfsd("umount", str(mnt), root=store_root)
        for name in volumes:
            assert volfsd("fsck", name, root=store_root).returncode == 0
