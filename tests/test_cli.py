"""The CLI's mount and umount, and every refusal: one line on stderr, exit status 1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from volfs import mounts

from conftest import run_dir_of, stop_daemon, volfsd


def refused(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == 1, done
    assert done.stderr.startswith("volfsd: ") and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in done.stderr, done.stderr


@pytest.mark.parametrize("name", ["", "UPPER", "../escape", "a/b", "-dash", "x" * 64, "sp ace"])
def test_bad_volume_names(store_root, tmp_path, name):
    done = volfsd("mount", "--", name, str(tmp_path / "m"), root=store_root, check=False)
    refused(done, "invalid volume name")


def test_relative_mountpoint(store_root):
    refused(volfsd("mount", "v", "relative/path", root=store_root, check=False), "absolute")


def test_nonempty_mountpoint(store_root, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "existing").write_text("x")
    refused(volfsd("mount", "v", str(tmp_path / "m"), root=store_root, check=False), "not empty")


def test_mountpoint_is_a_file(store_root, tmp_path):
    (tmp_path / "f").write_text("x")
    refused(volfs_mount := volfsd("mount", "v", str(tmp_path / "f"), root=store_root, check=False))
    assert "not a directory" in volfs_mount.stderr


def test_second_server_refused(volume, mnt, tmp_path):
    """Serving a volume the daemon serves, from another process, is refused."""
    done = volfsd("mount", "-f", volume.name, str(tmp_path / "other"), root=volume.root,
                  check=False)  # fmt: skip
    refused(done, "already being served", str(volume.pid))


def test_mount_on_a_mount_point_refused(volume, mnt, tmp_path):
    done = volfsd("mount", "another", str(mnt), root=volume.root, check=False)
    refused(done, "already a mount point")


def test_umount_of_something_else(store_root, tmp_path):
    refused(volfsd("umount", str(tmp_path), root=store_root, check=False), "not a volfs mount")
    refused(volfsd("umount", "rel", root=store_root, check=False), "absolute")


def test_umount_busy(volume, mnt):
    with open(mnt / "f", "w"):
        refused(volfsd("umount", str(mnt), root=volume.root, check=False), "busy")
    volume.unmount()


def test_store_root_missing_parent(tmp_path):
    done = volfsd("mount", "v", str(tmp_path / "m"), root=tmp_path / "no" / "such", check=False)
    refused(done, "does not exist")


def test_store_root_newer_format(store_root, tmp_path):
    store_root.mkdir()
    (store_root / "FORMAT").write_text("volfs-store 99\n")
    refused(volfsd("mount", "v", str(tmp_path / "m"), root=store_root, check=False), "upgrade")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a read-only bind mount")
def test_store_root_not_writable(tmp_path):
    root = tmp_path / "readonly"
    (root / "volumes").mkdir(parents=True)
    subprocess.run(["mount", "--bind", "-o", "ro", str(root), str(root)], check=True)
    try:
        done = volfsd("mount", "v", str(tmp_path / "m"), root=root, check=False)
    finally:
        subprocess.run(["umount", str(root)], check=True)
    refused(done, "not writable")


def test_volume_header_newer_format(volume, mnt):
    volume.unmount()
    header = volume.store / "volume"
    from volfs.store import frame

    header.write_bytes(b"".join(frame.encode({"kind": "volfs-volume", "format": 7})))
    done = volfsd("mount", volume.name, str(volume.store.parent.parent / "m9"),
                  root=volume.root, check=False)  # fmt: skip
    refused(done, "upgrade")


def test_dead_mount_is_cleared_by_the_next_mount(store_root, tmp_path):
    """A foreground server killed with SIGKILL leaves a dead mount; mount clears it."""
    mnt = tmp_path / "fg"
    proc = _foreground(store_root, "fgvol", mnt)
    try:
        (mnt / "f").write_bytes(b"kept")
        proc.kill()
        proc.wait()
        assert mounts.find_mount(mnt) is not None  # the dead mount is still there
        with pytest.raises(OSError):
            os.stat(mnt / "f")
        volfsd("mount", "fgvol", str(mnt), root=store_root)
        assert (mnt / "f").read_bytes() == b"kept"
    finally:
        stop_daemon(run_dir_of(store_root))
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if mounts.find_mount(mnt) is not None:
            mounts.detach(mnt, lazy=True)


def _foreground(store_root, name: str, mnt) -> subprocess.Popen:
    env = {
        **os.environ,
        "VOLFS_ROOT": str(store_root),
        "VOLFS_RUN_DIR": str(run_dir_of(store_root)),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "volfs", "mount", "-f", name, str(mnt)],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while mounts.find_mount(mnt) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mounts.find_mount(mnt) is not None, "the foreground mount did not appear"
    return proc


def test_foreground_mount_and_sigterm(store_root, tmp_path):
    mnt = tmp_path / "fg"
    proc = _foreground(store_root, "fgvol", mnt)
    try:
        (mnt / "f").write_bytes(b"foreground")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert mounts.find_mount(mnt) is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if mounts.find_mount(mnt) is not None:
            mounts.detach(mnt, lazy=True)
