"""Mount points a container can write: the root daemon follows no symlink in them, never lets
a write land in the directory under a mount, and mounts nothing it did not make."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from volfs import mounts

from helpers import needs_root, wait_gone, wait_until

pytestmark = needs_root("bind mounts need root")


def _crash(host, name: str) -> None:
    """kill -9 of the daemon and of the worker of *name*, as the OOM killer might."""
    for pid in (host.daemon_pid(), host.worker_pid(name)):
        os.kill(pid, signal.SIGKILL)
        assert wait_gone(pid, 30)


#: What a path or lock file gives while a volume heals: IndexError and ValueError from a lock
#: file read just as a new worker takes it (truncated, then written).
HEALING = (OSError, IndexError, ValueError)


@pytest.mark.expect_log(r"not mounted at \S+ again: mount point ")
def test_a_planted_symlink_is_never_followed(host, tmp_path):
    """Item 1 of the trial: while a volume is down, a container that can write the parent
    replaces the mount point with a symlink to a host directory.  The next daemon must
    neither create the target nor mount over it, and must say so."""
    parent = tmp_path / "volumes"
    escape = tmp_path / "host" / "escape-target"
    covered = tmp_path / "host" / "ssh"
    covered.mkdir(parents=True)
    (covered / "authorized_keys").write_text("the host's own\n")
    host.cli("mount", "photos", str(parent / "photos"))
    host.cli("mount", "photos", str(parent / "second"))
    (parent / "photos" / "f").write_bytes(b"kept")
    _crash(host, "photos")
    for path in (parent / "photos", parent / "second"):  # the dead mounts cleared by someone
        subprocess.run(["umount", "-l", str(path)], check=True)
    (parent / "photos").rmdir()
    (parent / "photos").symlink_to(escape)
    (parent / "second").rmdir()
    (parent / "second").symlink_to(covered)
    host.cli("mount", "other", str(tmp_path / "other"))  # a new daemon, with remembered mounts
    assert not escape.exists()
    assert mounts.find_mount(covered) is None and os.listdir(covered) == ["authorized_keys"]
    assert not [m for m in mounts.volfs_mounts() if m.mountpoint.startswith(str(tmp_path / "host"))]
    volume = host.status()["by_name"]["photos"]
    states = {m["path"]: m["state"] for m in volume["mounts"]}
    assert all(s.startswith("refused") and "symlink" in s for s in states.values()), states
    assert len(volume["problems"]) == 2
    assert "symlink" in (host.root / "logs" / "volfsd.log").read_text()
    # The operator puts the directory back and mounts again: the data is all there.
    (parent / "photos").unlink()
    (parent / "photos").mkdir()
    host.cli("mount", "photos", str(parent / "photos"))
    assert (parent / "photos" / "f").read_bytes() == b"kept"


_WRITER = """
import os, sys, time
path, stop = sys.argv[1], sys.argv[2]
n = 0
while not os.path.exists(stop):
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, b"%d\\n" % n)
        finally:
            os.close(fd)
        n += 1
    except OSError:
        time.sleep(0.001)  # the volume is healing: try the same line again
print(n)
"""


@pytest.mark.expect_log(r"its worker exited \(pid \d+, ")
def test_writes_during_a_heal_stay_in_the_volume(host, tmp_path):
    """Item 2 of the trial: a writer that goes on writing while the worker is killed gets
    errors during the heal, and nothing it writes lands in the directory under the mount."""
    mnt = tmp_path / "volumes" / "photos"
    host.cli("mount", "photos", str(mnt))
    stop = tmp_path / "stop"
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(mnt / "lines"), str(stop)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        for _ in range(3):
            wait_until(lambda: (mnt / "lines").stat().st_size > 0, "the writer's first line",
                       timeout=60, ignore=HEALING)  # fmt: skip
            old = host.worker_pid("photos")
            os.kill(old, signal.SIGKILL)
            wait_until(lambda old=old: host.worker_pid("photos") != old, "a new worker",
                       timeout=60, ignore=HEALING)  # fmt: skip
            wait_until(lambda: os.statvfs(mnt) is not None, "the volume back at its path",
                       timeout=60, ignore=HEALING)  # fmt: skip
        stop.touch()
        written = int(writer.communicate(timeout=60)[0])
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert host.status()["by_name"]["photos"]["restarts"] == 3
    host.cli("umount", str(mnt))
    assert os.listdir(mnt) == [], "writes landed in the directory under the mount"
    host.cli("mount", "photos", str(mnt))
    numbers = [int(n) for n in (mnt / "lines").read_text().split()]
    # A write cut short by the kill may be stored and then retried: repeats, never gaps.
    assert sorted(set(numbers)) == list(range(written))
    assert numbers == sorted(numbers)


def test_nested_volumes_are_refused(host, tmp_path):
    """Item 7: a volume mounted inside another would vanish when the outer one heals."""
    outer = tmp_path / "photos"
    host.cli("mount", "photos", str(outer))
    host.refused("mount", "big", str(outer / "nested"), words=("nested", "photos"))
    assert not (outer / "nested").exists()


def test_staging_mounts_are_not_user_mounts(host, tmp_path):
    """Item 6: the daemon's staging mount is neither unmounted nor bound by hand."""
    host.cli("mount", "q", str(tmp_path / "first"))
    staging = host.run / "staging" / "q"
    host.refused("umount", str(staging), words=("staging",))
    assert mounts.find_mount(staging) is not None
    host.cli("mount", "q", str(tmp_path / "second"))
    (tmp_path / "second" / "f").write_bytes(b"in the volume")
    assert (tmp_path / "first" / "f").read_bytes() == b"in the volume"
    assert not any(p.name == "f" for p in host.run.rglob("f") if "staging" not in str(p))


def test_a_worker_without_control_socket_needs_a_remount(host, tmp_path):
    """Item 3: a worker the new daemon cannot speak to (an older volfs) keeps serving; status
    says it needs a remount, and unmounting it works."""
    mnt = tmp_path / "m"
    host.cli("mount", "v", str(mnt))
    worker = host.worker_pid("v")
    os.kill(host.daemon_pid(), signal.SIGKILL)
    (host.run / "workers" / "v.sock").unlink()
    host.cli("mount", "other", str(tmp_path / "other"))
    volume = host.status()["by_name"]["v"]
    assert volume["status"] == "needs-remount" and volume["worker_pid"] == worker
    assert any("control socket" in p for p in volume["problems"])
    (mnt / "f").write_bytes(b"still served")
    host.cli("umount", str(mnt))
    assert wait_gone(worker, 30)
    host.cli("mount", "v", str(mnt))
    assert host.status()["by_name"]["v"]["status"] == "mounted"
    assert (mnt / "f").read_bytes() == b"still served"


def test_status_shape(host, tmp_path):
    host.cli("mount", "v", str(tmp_path / "rw"))
    host.cli("mount", "--ro", "v", str(tmp_path / "ro"))
    status = host.status()
    assert set(status["daemon"]) >= {"pid", "version", "uptime", "socket", "store"}
    (volume,) = status["volumes"]
    assert set(volume) >= {"name", "status", "worker_pid", "restarts", "adopted", "mounts",
                           "problems"}  # fmt: skip
    assert volume["mounts"] == [
        {"path": str(tmp_path / "ro"), "read_only": True, "state": "mounted"},
        {"path": str(tmp_path / "rw"), "read_only": False, "state": "mounted"},
    ]
    assert volume["last_scrub"] is None and volume["disk_free"] > 0
    assert volume["garbage_ratio"] is None or 0 <= volume["garbage_ratio"] <= 1  # usage lags
    host.cli("scrub", "v")
    (volume,) = host.status()["volumes"]
    assert volume["last_scrub"]["problems"] == 0 and volume["last_scrub"]["verified"] >= 0
    table = host.cli("status").stdout.splitlines()
    assert table[1].split() == ["VOLUME", "STATUS", "WORKER", "RESTARTS", "ADOPTED", "SCRUBBED",
                                "GARBAGE", "MOUNTS"]  # fmt: skip
    assert table[2].split()[:2] == ["v", "mounted"] and "(ro)" in table[2]
    assert "clean" in table[2] and table[-1].startswith("free on the store's disk: ")
    [inspected] = json.loads(host.cli("inspect", "v").stdout)
    assert inspected["last_scrub"]["problems"] == 0 and inspected["disk_free"] > 0


def test_umount_leaves_another_daemons_mounts_alone(host, tmp_path):
    """Item 6: with two daemons (two stores), `umount` through the one detaches nothing the
    other serves, and says whose it is."""
    from hosts import Host

    (tmp_path / "second").mkdir()
    other = Host(tmp_path / "second")
    try:
        other.cli("mount", "q", str(tmp_path / "theirs"))
        host.cli("mount", "mine", str(tmp_path / "mine"))
        host.refused("umount", str(tmp_path / "theirs"), words=("another store or daemon",))
        assert mounts.find_mount(tmp_path / "theirs") is not None
        (tmp_path / "theirs" / "f").write_bytes(b"still served")
        rows = [line.split()[0] for line in host.cli("ls").stdout.splitlines()[1:]]
        assert rows == ["mine"]
    finally:
        other.cleanup()


def test_an_open_file_holds_only_the_path_it_was_opened_through(host, tmp_path):
    """Item 4, one path of several: a file open through path a refuses `umount a`, and does
    not hold path b, through which the volume stays for everyone anyway."""
    a, b = tmp_path / "a", tmp_path / "b"
    host.cli("mount", "v", str(a))
    host.cli("mount", "v", str(b))
    with open(a / "f", "wb") as f:
        f.write(b"open")
        host.refused("umount", str(a), words=("busy", f"pid {os.getpid()}", "--lazy"))
        host.cli("umount", str(b))
        assert mounts.find_mount(b) is None and mounts.find_mount(a) is not None
    host.cli("umount", str(a))
