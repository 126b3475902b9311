"""What `ls` shows of mounts: only this store's volume's own, and which of them are read-only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from volfs import mounts
from volfs.catalog import describe
from volfs.store.root import StoreRoot

from conftest import Volume
from helpers import needs_root, run_dir_of, stop_foreground, volfsd, wait_until

ROOT_ONLY = needs_root("bind mounts need root")


def _listed(root: Path, name: str) -> dict:
    lines = volfsd("ls", "--format", "json", root=root).stdout.splitlines()
    return next(row for row in map(json.loads, lines) if row["name"] == name)


def test_a_second_stores_volume_of_the_same_name_is_not_ours(tmp_path):
    """Two stores with a volume of one name, both mounted: each lists its own mounts only."""
    name = f"photos-{uuid.uuid4().hex[:8]}"  # none of the host's other mounts is named so
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Volume(tmp_path / "a" / "store", name, tmp_path / "a")
    b = Volume(tmp_path / "b" / "store", name, tmp_path / "b")
    try:
        b_path = b.mount()
        volfsd("create", name, root=a.root)
        # a's volume is not served: b's mount, named alike, is not a's.
        assert describe(StoreRoot(a.root), name)["mounts"] == []
        assert _listed(a.root, name)["mounts"] == []
        assert _listed(a.root, name)["status"] == "unmounted"
        a_path = a.mount()
        a_staging = run_dir_of(a.root) / "staging" / name
        root_a, root_b = StoreRoot(a.root), StoreRoot(b.root)
        dev_a, dev_b = mounts.find_mount(a_path).device, mounts.find_mount(b_path).device
        assert dev_a != dev_b
        # Given its device (as the daemon will), each matches exactly its own mounts.
        assert describe(root_a, name, staging=a_staging, device=dev_a)["mounts"] == [str(a_path)]
        assert describe(root_b, name, device=dev_b)["mounts"] == sorted(
            [str(b_path), str(run_dir_of(b.root) / "staging" / name)]
        )
        # Without it, the worker's device file (volumes/NAME/device, "major:minor\n") does.
        assert root_a.served_device(name) == dev_a
        assert describe(root_a, name, staging=a_staging)["mounts"] == [str(a_path)]
        assert _listed(a.root, name)["mounts"] == [str(a_path)]  # through a's daemon
        assert _listed(b.root, name)["mounts"] == [str(b_path)]
        # A device file is trusted only while the volume is served, and only if well-formed.
        a.unmount()
        assert describe(root_a, name)["mounts"] == []
        (a.store / "device").write_text("not a device\n")
        assert root_a.served_device(name) is None
    finally:
        a.cleanup()
        b.cleanup()


@ROOT_ONLY
def test_read_only_paths_are_marked_through_the_daemon(store_root, tmp_path):
    # A name of its own, so that no other session's mount on this host can match it.
    volume = Volume(store_root, f"ro-{uuid.uuid4().hex[:8]}", tmp_path)
    try:
        rw = volume.mount()
        ro = tmp_path / "ro"
        volume.mount(ro, "--ro")
        row = _listed(volume.root, volume.name)
        assert row["mounts"] == sorted([str(rw), str(ro)]) and row["read_only"] == [str(ro)]
        table = volfsd("ls", root=volume.root).stdout.splitlines()
        line = next(line for line in table if line.startswith(volume.name + " "))
        assert f"{ro} (ro)" in line and f"{rw} (ro)" not in line
    finally:
        volume.cleanup()


def test_read_only_paths_are_marked_without_the_daemon(store_root, tmp_path):
    """A foreground read-only mount: `ls` reads it off the mount table (per-mount options)."""
    mnt = tmp_path / "fg"
    env = {**os.environ, "VOLFS_ROOT": str(store_root),
           "VOLFS_RUN_DIR": str(run_dir_of(store_root))}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "volfs", "mount", "-f", "--ro", "fgvol",
                             str(mnt)], env=env, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_until(lambda: mounts.find_mount(mnt), "the foreground mount to appear")
        row = _listed(store_root, "fgvol")
        assert row["mounts"] == [str(mnt)] and row["read_only"] == [str(mnt)]
        assert f"{mnt} (ro)" in volfsd("ls", root=store_root).stdout
    finally:
        stop_foreground(proc, mnt)
