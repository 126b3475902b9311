"""The owner and mode of a new volume's root directory (`create --uid --gid --mode`, the
config keys of those names): so that a non-root user, such as WordPress's uid 33, can write to
a fresh volume, and nobody else can where the mode says so."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from volfs import mounts
from volfs.errors import ErrorCode, VolfsError
from volfs.store import frame, headers
from volfs.store.readonly import open_readonly
from volfs.store.root import StoreRoot
from volfs.store.state import ROOT_INO

from helpers import as_nobody, as_user, needs_root, wait_until
from hosts import Host

ROOT_ONLY = needs_root("acting as other uids needs root")
WWW_DATA = 33  #: WordPress's user in its image (Debian's www-data)


@pytest.fixture
def public_dir() -> Path:
    """A directory other users can traverse, for mount points (pytest's are root's only)."""
    path = Path(tempfile.mkdtemp(prefix="volfs-owner-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for entry in mounts.volfs_mounts():
            if entry.mountpoint.startswith(f"{path}/"):
                mounts.detach(entry.mountpoint, lazy=True)
        shutil.rmtree(path, ignore_errors=True)


def root_of(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def inspect(host: Host, name: str) -> dict:
    return json.loads(host.cli("inspect", name).stdout)[0]


@ROOT_ONLY
def test_a_fresh_volume_is_writable_by_its_owner_only(host, public_dir):
    """Made without the daemon, then with it: uid 33 writes to the fresh mount, uid 65534
    (mode 0750, not in group 33) cannot, and it all survives a remount."""
    owned = ("--uid", "33", "--gid", "33", "--mode", "0750")
    host.cli("create", "wp", *owned)  # no daemon yet: the store directly
    mnt = public_dir / "wp"
    host.cli("mount", "wp", str(mnt))
    host.cli("create", "wp2", *owned)  # through the daemon
    mnt2 = public_dir / "wp2"
    host.cli("mount", "wp2", str(mnt2))
    for path in (mnt, mnt2):
        assert root_of(path) == (WWW_DATA, WWW_DATA, 0o750)
        wrote = as_user(WWW_DATA, "sh", "-c", f"echo uploaded > {path}/f && mkdir {path}/d")
        assert wrote.returncode == 0, wrote.stderr
        assert os.stat(path / "f").st_uid == WWW_DATA and os.stat(path / "d").st_gid == WWW_DATA
        other = as_nobody("touch", f"{path}/g")
        assert other.returncode != 0 and "Permission denied" in other.stderr, other
        assert not (path / "g").exists()
    info = inspect(host, "wp")
    assert (info["uid"], info["gid"], info["mode"]) == (WWW_DATA, WWW_DATA, "0750")
    host.cli("umount", str(mnt))
    host.cli("fsck", "wp")
    host.cli("mount", "wp", str(mnt))
    assert root_of(mnt) == (WWW_DATA, WWW_DATA, 0o750)
    assert (mnt / "f").read_text() == "uploaded\n"


def test_create_again_alike_is_a_no_op_and_otherwise_refused(host, tmp_path):
    host.cli("create", "wp", "--uid", "33", "--gid", "33", "--mode", "2775")
    header = (host.root / "volumes" / "wp" / "volume").read_bytes()
    host.cli("create", "wp")  # nothing given: nothing differs
    host.cli("create", "wp", "--uid", "33", "--mode", "02775")  # the same, spelled otherwise
    assert (host.root / "volumes" / "wp" / "volume").read_bytes() == header
    for flag, value in (("--uid", "34"), ("--gid", "0"), ("--mode", "0755")):
        host.refused("create", "wp", flag, value, words=("already exists", "uid 33, gid 33",
                                                         "mode 2775"))  # fmt: skip
    host.cli("mount", "wp", str(tmp_path / "m"))  # and so through the daemon
    host.refused("create", "wp", "--uid", "0", words=("already exists", "uid 33"))
    host.cli("create", "wp", "--gid", "33")
    assert root_of(tmp_path / "m") == (WWW_DATA, WWW_DATA, 0o2775)
    (tmp_path / "m" / "new").mkdir()  # setgid: what is made in it keeps its group
    assert root_of(tmp_path / "m" / "new")[1:] == (WWW_DATA, stat.S_ISGID | 0o755)
    # A volume made without them has the default root (the daemon's owner, 0755) and says so.
    host.cli("create", "plain")
    host.cli("create", "plain", "--uid", str(os.getuid()), "--mode", "755")  # alike
    plain = inspect(host, "plain")
    assert (plain["uid"], plain["gid"], plain["mode"]) == (os.getuid(), os.getgid(), "0755")
    host.cli("mount", "plain", str(tmp_path / "p"))
    assert root_of(tmp_path / "p") == (os.getuid(), os.getgid(), 0o755)


@pytest.mark.parametrize(
    "flag, value, words",
    [
        ("--uid", "www-data", ("give the number", "id -u www-data")),
        ("--gid", "www-data", ("give the number", "id -g www-data")),
        ("--uid", "-1", ("invalid uid", "0 to 4294967294")),
        ("--gid", "4294967295", ("invalid gid", "0 to 4294967294")),
        ("--uid", "1.5", ("invalid uid",)),
        ("--mode", "17777", ("invalid mode", "at most 7777")),
        ("--mode", "rwx", ("invalid mode", "0755")),
        ("--mode", "0o755", ("invalid mode",)),
        ("--mode", "-755", ("invalid mode",)),
    ],
)
def test_bad_values_are_one_line_errors(host, flag, value, words):
    host.refused("create", "v", f"{flag}={value}", words=words)
    assert not (host.root / "volumes" / "v").exists()


def test_a_never_mounted_volume_is_checked_with_its_root_as_created(tmp_path):
    """fsck and scrub load a volume nobody mounted yet with the root it will get."""
    root = StoreRoot(tmp_path / "store")
    root.create_volume("new", uid=WWW_DATA, gid=7, mode=0o700)
    snapshot = open_readonly(root.volume_path("new"), "new")
    try:
        made = snapshot.inodes[ROOT_INO]
        assert (made.uid, made.gid, made.mode) == (WWW_DATA, 7, stat.S_IFDIR | 0o700)
    finally:
        snapshot.close()


def test_a_header_without_the_key_gives_the_old_root(tmp_path):
    """Volumes made before the ``root`` key (the golden store's) get the root they always got."""
    root = StoreRoot(tmp_path / "store")
    header = root.create_volume("old")
    del header["root"]
    (root.volume_path("old") / "volume").write_bytes(b"".join(frame.encode(header)))
    assert headers.root_attrs(root.header("old")) == (os.getuid(), os.getgid(), 0o755)
    volume = root.open_volume("old", create=False)
    try:
        made = volume.inodes[ROOT_INO]
        assert (made.uid, made.gid, made.mode) == (os.getuid(), os.getgid(), stat.S_IFDIR | 0o755)
    finally:
        volume.close()


@pytest.mark.parametrize("given", [{"mode": 0o17777}, {"uid": -1}, {"gid": 1 << 32}])
def test_the_store_writes_no_root_it_could_not_read(tmp_path, given):
    """Past the parsers too: a header the store would call damaged is never written."""
    root = StoreRoot(tmp_path / "store")
    with pytest.raises(VolfsError, match="invalid owner or mode") as info:
        root.create_volume("v", **given)
    assert info.value.code == ErrorCode.INVALID
    assert not root.exists("v") and not root.volume_path("v").exists()


@pytest.mark.parametrize(
    "bad", [{"uid": -1}, {"gid": 1 << 32}, {"mode": 0o17777}, {"uid": "33"}, [33, 33, 0o755]]
)
def test_a_damaged_root_key_is_refused(tmp_path, bad):
    root = StoreRoot(tmp_path / "store")
    header = root.create_volume("v")
    header["root"] = bad
    (root.volume_path("v") / "volume").write_bytes(b"".join(frame.encode(header)))
    with pytest.raises(VolfsError, match="header file is damaged \\(bad root\\)") as info:
        root.header("v")
    assert info.value.code == ErrorCode.DAMAGED


@ROOT_ONLY
def test_config_keys_give_a_declared_volume_its_owner(host, public_dir):
    mnt = public_dir / "uploads"
    config = host.tmp / "volumes.toml"
    config.write_text(f'[volumes.media]\npaths = ["{mnt}"]\nuid = 33\ngid = "33"\nmode = "0770"\n')
    proc = subprocess.Popen([sys.executable, "-m", "volfs", "serve", "--config", str(config)],
                            env=host.env, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_until(lambda: mounts.find_mount(mnt), "the declared volume mounted", timeout=60)
        assert root_of(mnt) == (WWW_DATA, WWW_DATA, 0o770)
        wrote = as_user(WWW_DATA, "touch", f"{mnt}/thumb.jpg")
        assert wrote.returncode == 0, wrote.stderr
        info = inspect(host, "media")
        assert (info["uid"], info["gid"], info["mode"]) == (WWW_DATA, WWW_DATA, "0770")
        host.cli("umount", "--all")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
