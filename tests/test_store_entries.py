"""Bad entries planted in a store root hide only themselves, and are named, never followed.

A symbolic link, a file or a header-less directory in ``volumes/`` is left out of `ls` with a
warning naming it; a volume directory with a bad header is listed as damaged; links or FIFOs
in place of log and lock files are refused with an error naming the path.  Nothing is ever an
"internal error", and no planted file is read, written or hung on.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from volfs import mounts
from volfs.store import frame

from conftest import Volume
from helpers import run_dir_of, volfsd


def _rows(done) -> dict[str, dict]:
    assert done.returncode == 0, done.stderr
    return {row["name"]: row for row in map(json.loads, done.stdout.splitlines())}


def _one_line(done, *words: str) -> None:
    assert done.returncode == 1, done
    assert done.stderr.startswith("volfsd: ") and done.stderr.count("\n") == 1, done.stderr
    assert "internal error" not in done.stderr, done.stderr
    for word in words:
        assert word in done.stderr, done.stderr


def test_bad_entries_in_volumes_hide_only_themselves(volume: Volume, tmp_path: Path):
    root = volume.root
    for name in (volume.name, "bad", "typed", "locked", "template"):
        volfsd("create", name, root=root)
    vols = root / "volumes"
    bait = tmp_path / "bait"
    bait.write_bytes(b"not ours")
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(vols / "template", elsewhere / "template")
    volfsd("rm", "template", root=root)
    (vols / "linked").symlink_to(elsewhere / "template")  # a whole volume, through a link
    (vols / "afile").write_bytes(b"x")
    (vols / "emptydir").mkdir()
    os.mkfifo(vols / "fifo")
    (vols / "bad" / "volume").write_bytes(b"garbage" * 10)
    # A header that decodes, with fields of the wrong types.
    (vols / "typed" / "volume").write_bytes(b"".join(frame.encode({
        "kind": "volfs-volume", "format": 1, "name": "typed", "id": 7, "created_ns": "x",
        "segment_size": 1 << 20, "block_size": frame.BLOCK_SIZE, "size": -1, "labels": [1],
    })))  # fmt: skip
    (vols / "locked" / "lock").symlink_to(bait)
    ignored = ["linked", "afile", "emptydir", "fifo"]

    def check_listing(done) -> None:
        rows = _rows(done)
        assert sorted(rows) == ["bad", "locked", "testvol", "typed"]
        assert rows["bad"]["status"].startswith("damaged: volume bad: its header file")
        assert rows["typed"]["status"].startswith("damaged: volume typed: its header file")
        assert "bad id, created_ns, size, labels" in rows["typed"]["status"]
        lock = vols / "locked" / "lock"
        assert f"lock file {lock} is a symbolic link" in rows["locked"]["status"]

    # Without a daemon: the CLI reads the store itself and warns on stderr.
    done = volfsd("ls", "--format", "json", root=root)
    check_listing(done)
    for name in ignored:
        assert f"ignoring {vols / name}: " in done.stderr, done.stderr
    assert "WARNING" in done.stderr
    # The volume next to them mounts, and is listed, through the daemon as well.
    mnt = volume.mount()
    (mnt / "f").write_bytes(b"fine")
    check_listing(rows := volfsd("ls", "--format", "json", root=root))
    assert str(mnt) in _rows(rows)["testvol"]["mounts"]
    daemon_log = (root / "logs" / "volfsd.log").read_text()
    for name in ignored:
        assert f"ignoring {vols / name}: " in daemon_log
    # Asked for by name, each bad entry says what it is; none is followed or touched.
    info = json.loads(volfsd("inspect", "linked", root=root).stdout)[0]
    assert info["status"] == (
        f"damaged: volume linked: {vols / 'linked'} is a symbolic link, not a volume "
        "directory (volfs follows no links in its store): move it out of the store"
    )
    for name, words in (
        ("linked", (str(vols / "linked"), "symbolic link")),
        ("afile", (str(vols / "afile"), "a regular file")),
        ("fifo", (str(vols / "fifo"), "a FIFO")),
        ("locked", (str(vols / "locked" / "lock"), "symbolic link")),
    ):
        _one_line(volfsd("mount", name, str(tmp_path / f"m-{name}"), root=root, check=False),
                  *words)  # fmt: skip
        _one_line(volfsd("rm", name, root=root, check=False), *words)
        assert mounts.find_mount(tmp_path / f"m-{name}") is None
    assert bait.read_bytes() == b"not ours"
    assert sorted(os.listdir(elsewhere / "template")) == ["volume"]
    # The header-less directory is no volume yet; creating it completes it.
    _one_line(volfsd("rm", "emptydir", root=root, check=False), "no such volume")
    volfsd("create", "emptydir", root=root)
    volfsd("rm", "bad", "typed", root=root)
    listed = sorted(_rows(volfsd("ls", "--format", "json", root=root)))
    assert listed == ["emptydir", "locked", "testvol"]
    assert (mnt / "f").read_bytes() == b"fine"


def _plant_link(path: Path, bait: Path) -> None:
    path.symlink_to(bait)


def _plant_fifo(path: Path, bait: Path) -> None:
    os.mkfifo(path)


PLANTED = {
    # what is planted, where (relative to the test's directory), what the error names
    "volume log link": (_plant_link, "store/logs/v.log", "is a symbolic link"),
    "volume log fifo": (_plant_fifo, "store/logs/v.log", "is a FIFO"),
    "daemon log link": (_plant_link, "store/logs/volfsd.log", "is a symbolic link"),
    "logs dir link": (_plant_link, "store/logs", "is a symbolic link"),
    "lock link": (_plant_link, "store/volumes/v/lock", "is a symbolic link"),
    "lock fifo": (_plant_fifo, "store/volumes/v/lock", "is a FIFO"),
    "daemon pid file link": (_plant_link, "run/volfsd.pid", "is a symbolic link"),
}


@pytest.mark.parametrize("planted", sorted(PLANTED))
def test_planted_log_and_lock_files_are_refused_by_path(store_root, tmp_path, planted):
    plant, where, words = PLANTED[planted]
    bait = tmp_path / "bait"
    bait.mkdir() if where.endswith("logs") else bait.write_bytes(b"not ours")
    volfsd("create", "v", root=store_root)
    if where.startswith("store/logs/"):
        (store_root / "logs").mkdir(mode=0o700)
    run_dir_of(store_root).mkdir(mode=0o700, exist_ok=True)
    path = tmp_path / where
    plant(path, bait)
    mnt = tmp_path / "m"
    try:
        done = volfsd("mount", "v", str(mnt), root=store_root, check=False)
        _one_line(done, str(path), words)
        assert mounts.find_mount(mnt) is None
    finally:
        if mounts.find_mount(mnt) is not None:
            mounts.detach(mnt, lazy=True)
    if bait.is_dir():
        assert os.listdir(bait) == []
    else:
        assert bait.read_bytes() == b"not ours"
