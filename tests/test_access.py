"""Nobody let in: other users reach neither the daemon nor the store, the store never follows
a link planted among its files, and a store made readable to others is made private again."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import as_nobody, needs_root, run_dir_of, stop_daemon, volfsd

ROOT_ONLY = needs_root("acting as another uid needs root")


@pytest.fixture
def public_tmp():
    """A directory other users can traverse (pytest's own are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="volfs-access-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        stop_daemon(path / "run")
        subprocess.run(["fusermount3", "-uz", str(path / "mnt")], capture_output=True)
        shutil.rmtree(path, ignore_errors=True)


@ROOT_ONLY
def test_other_users_are_refused_by_daemon_and_store(public_tmp):
    root, run = public_tmp / "store", public_tmp / "run"
    env = {**os.environ, "VOLFS_ROOT": str(root), "VOLFS_RUN_DIR": str(run)}
    mnt = public_tmp / "mnt"
    volfsd("mount", "v", str(mnt), root=root)  # its run dir is public_tmp/run
    (mnt / "f").write_bytes(b"secret")
    for path in [root, run, *root.rglob("*"), *run.glob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_dir() and not path.is_symlink():
            assert mode == 0o700, path
        elif not path.is_symlink():
            assert mode & 0o077 == 0, (path, oct(mode))
    python = [sys.executable, "-m", "volfs"]
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    for args in (["status"], ["ls"], ["umount", str(mnt)], ["rm", "-f", "v"], ["inspect", "v"]):
        done = as_nobody(*python, *args, env=env)
        assert done.returncode == 1, (args, done)
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
        assert "permission" in done.stderr.lower() or "not writable" in done.stderr, done.stderr
    assert (mnt / "f").read_bytes() == b"secret"  # nothing changed
    # A link inside the volume to the store leads nowhere for them either.
    os.chmod(mnt, 0o777)
    link = as_nobody("sh", "-c", f"ln -s {root} {mnt}/store && cat {mnt}/store/FORMAT", env=env)
    assert link.returncode != 0 and "Permission denied" in link.stderr, link
    # trusted.* xattrs are root's: others can neither set nor see them.
    os.setxattr(mnt / "f", "trusted.owner-only", b"root")
    os.chmod(mnt / "f", 0o666)
    code = (
        "import os, sys\n"
        f"f = {str(mnt / 'f')!r}\n"
        "try:\n    os.setxattr(f, 'trusted.x', b'1')\nexcept OSError as e:\n    print(e.errno)\n"
        "print(sorted(os.listxattr(f)))\n"
        "try:\n    os.getxattr(f, 'trusted.owner-only')\nexcept OSError as e:\n    print(e.errno)\n"
    )
    done = as_nobody(sys.executable, "-c", code, env=env)
    assert done.stdout.split("\n")[:3] == ["1", "[]", "61"], done  # EPERM, nothing, ENODATA


@pytest.mark.store_damaged("a symlink planted in the store: the check refuses to follow it")
@pytest.mark.expect_log("is a symbolic link: volfs follows no links in its store")
@pytest.mark.parametrize("planted", ["checkpoint", "durable", "seg-00000009.log", "volume"])
def test_planted_symlink_is_never_followed(volume, tmp_path, planted):
    mnt = volume.mount()
    (mnt / "f").write_bytes(b"data")
    volume.unmount()
    bait = tmp_path / "bait"
    bait.write_bytes(b"not a store file")
    target = volume.store / planted
    if target.exists():
        target.unlink()
    target.symlink_to(bait)
    done = volfsd("mount", volume.name, str(tmp_path / "again"), root=volume.root, check=False)
    assert bait.read_bytes() == b"not a store file"  # never read as ours, never written
    if done.returncode == 0:  # the link was ignored or replaced, never followed
        volume.path = tmp_path / "again"
        volume.pid = int((volume.store / "lock").read_text().split()[0])
        volume._paths.append(volume.path)
        volume.unmount()
    else:  # refused, naming the link, not as an internal error
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
        assert f"{target} is a symbolic link" in done.stderr, done.stderr
    assert bait.read_bytes() == b"not a store file"


def test_world_readable_store_is_made_private_again(volume, tmp_path):
    """A store made world-readable from outside (chmod 755/644) gets its private modes back
    when it is next opened, with a warning naming each path that was open."""
    root = volume.root
    mnt = volume.mount()
    (mnt / "f").write_bytes(b"secret contents")
    volume.unmount()
    stop_daemon(run_dir_of(root))  # so that `ls` opens the store itself, in the CLI
    opened = [root, *root.rglob("*")]
    for path in opened:
        path.chmod(0o755 if path.is_dir() else 0o644)
    done = volfsd("ls", root=root)
    top = [root, root / "volumes", volume.store, root / "logs", *(root / "logs").iterdir()]
    for path in top:
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
        old = "0755" if path.is_dir() else "0644"
        assert _warned(done.stderr, f"{path} had mode {old}, open to other users"), done.stderr
    # The volume's own files are repaired when it is opened: by the worker that mounts it.
    mnt = volume.mount()
    assert (mnt / "f").read_bytes() == b"secret contents"
    worker_log = volume.log_file.read_text()
    for path in opened:
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
        if path.parent == volume.store:
            assert _warned(worker_log, f"{path} had mode 0644, open to other users"), path


def _warned(log_text: str, words: str) -> bool:
    return any("WARNING" in line and words in line for line in log_text.splitlines())
