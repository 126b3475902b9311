"""Volumes used by real containers, in the session's own Docker engine (tests/docker_engine.py).

What the README promises containers: a bind of the mount point shows the same files and locks
as the host and other containers, non-root container users get the kernel's permission checks,
and a bind of the mount point's *parent* with rslave propagation survives a restart of the
volume's serving process.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from volfs import mounts
from volfs.users import NAMESPACE, describe_users, users_of

from conftest import Volume
from docker_engine import DockerEngine
from helpers import run_dir_of, volfsd, wait_gone, wait_until

# Containers that are driven with `docker exec`: they do nothing by themselves, and the
# fixtures remove them (SIGKILL) long before this runs out.
IDLE = ("sleep", "600")


def test_writes_are_seen_at_once_by_host_and_containers(mnt: Path, engine: DockerEngine):
    a = engine.run_container("-v", f"{mnt}:/p", engine.image, *IDLE)
    b = engine.run_container("-v", f"{mnt}:/p", engine.image, *IDLE)

    engine.exec(a, "sh", "-c", "echo from-a > /p/a && dd if=/dev/zero of=/p/big bs=64k count=16")
    assert (mnt / "a").read_text() == "from-a\n"
    assert (mnt / "big").stat().st_size == 1 << 20

    (mnt / "h").write_text("from-host\n")
    assert engine.exec(a, "cat", "/p/h").stdout == "from-host\n"

    assert engine.exec(b, "cat", "/p/a").stdout == "from-a\n"
    engine.exec(b, "sh", "-c", "echo from-b > /p/b && mv /p/a /p/a2 && rm /p/h")
    assert engine.exec(a, "cat", "/p/b").stdout == "from-b\n"
    assert engine.exec(a, "ls", "/p").stdout.split() == ["a2", "b", "big"]
    assert sorted(os.listdir(mnt)) == ["a2", "b", "big"]


def test_non_root_container_user_gets_permission_checks(mnt: Path, engine: DockerEngine):
    (mnt / "closed").mkdir(mode=0o755)  # root-owned, as root made it
    (mnt / "open").mkdir()
    (mnt / "open").chmod(0o777)
    (mnt / "secret").write_text("root only\n")
    (mnt / "secret").chmod(0o600)
    user = engine.run_container("-v", f"{mnt}:/p", "--user", "1000:1000", engine.image, *IDLE)

    assert engine.exec(user, "id").stdout.split()[:2] == ["uid=1000", "gid=1000"]
    denied = engine.exec(user, "touch", "/p/closed/x", check=False)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied
    assert not (mnt / "closed" / "x").exists()
    denied = engine.exec(user, "cat", "/p/secret", check=False)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied

    engine.exec(user, "touch", "/p/open/x")
    made = (mnt / "open" / "x").stat()
    assert (made.st_uid, made.st_gid) == (1000, 1000)
    # Root in the container is root on the host: the same tree is writable for it.
    engine.exec(user, "touch", "/p/closed/y", user="0")
    assert (mnt / "closed" / "y").stat().st_uid == 0


def test_a_volume_made_for_a_container_user_is_writable_by_it(volume: Volume, engine: DockerEngine):
    """WordPress's case: a fresh volume created for uid 33 takes its uploads at once; another
    non-root user is kept out by the mode (0750), and root in a container is still root."""
    volfsd("create", volume.name, "--uid", "33", "--gid", "33", "--mode", "0750", root=volume.root)
    mnt = volume.mount()
    uploads = "/var/www/html/wp-content/uploads"
    web = engine.run_container("-v", f"{mnt}:{uploads}", "--user", "33:33", engine.image, *IDLE)
    engine.exec(web, "sh", "-c", f"mkdir {uploads}/2026 && echo jpeg > {uploads}/2026/a.jpg")
    made = (mnt / "2026" / "a.jpg").stat()
    assert (made.st_uid, made.st_gid) == (33, 33)
    assert engine.exec(web, "stat", "-c", "%u:%g %a", uploads).stdout == "33:33 750\n"
    other = engine.run_container("-v", f"{mnt}:/p", "--user", "1000:1000", engine.image, *IDLE)
    denied = engine.exec(other, "ls", "/p", check=False)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied
    assert engine.exec(other, "cat", "/p/2026/a.jpg", user="0").stdout == "jpeg\n"


def test_a_container_holding_the_volume_is_named(mnt: Path, engine: DockerEngine):
    """users.py finds the container's mount namespace, and names it by Docker's id (from the
    container's cgroup), though no process in it has a file open on the volume."""
    user = engine.run_container("-v", f"{mnt}:/p", engine.image, *IDLE)
    container = engine.docker("inspect", "-f", "{{.Id}}", user).stdout.strip()
    device = mounts.find_mount(mnt).device
    found = [u for u in users_of(device) if u.container == container[:12]]
    assert [u.what for u in found] == [NAMESPACE], found
    assert describe_users(found).startswith(f"container {container[:12]} (pid ")
    engine.docker("rm", "-f", user)
    assert not [u for u in users_of(device) if u.container == container[:12]]


def test_flock_in_one_container_blocks_another(mnt: Path, engine: DockerEngine):
    holder = engine.run_container(
        "-v", f"{mnt}:/p", engine.image, "flock", "/p/lock", "sh", "-c", "touch /p/held; sleep 600"
    )
    other = engine.run_container("-v", f"{mnt}:/p", engine.image, *IDLE)
    wait_until((mnt / "held").exists, "the first container to take the lock")

    tried = engine.exec(other, "flock", "-n", "/p/lock", "true", check=False)
    assert (tried.returncode, tried.stderr) == (1, ""), tried  # flock: "already locked"
    # The host, through its own path to the volume, is blocked as well.
    with open(mnt / "lock") as f, pytest.raises(BlockingIOError):
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)

    engine.docker("kill", holder)  # its lock goes with its last process
    wait_until(
        lambda: engine.exec(other, "flock", "-n", "/p/lock", "true", check=False).returncode == 0,
        "the lock to be free once its holder was killed",
    )


@pytest.fixture
def shared_parent(tmp_path: Path) -> Iterator[Path]:
    """A directory made a shared mount, as the parent-bind recipe needs, and unmade after.

    / is a private mount on these machines, and Docker refuses rslave propagation from a
    private source. The volume must be mounted *after* this, so that its mount lands inside
    the shared mount (and reaches the containers' slave copies).
    """
    parent = tmp_path / "volumes"
    parent.mkdir()
    subprocess.run(["mount", "--bind", parent, parent], check=True, timeout=60)
    try:
        subprocess.run(["mount", "--make-rshared", parent], check=True, timeout=60)
        yield parent
    finally:
        # The volume's own teardown has unmounted it by now; -R takes anything left with it.
        if subprocess.run(["umount", "-R", parent], capture_output=True, timeout=60).returncode:
            subprocess.run(["umount", "-R", "-l", parent], capture_output=True, timeout=60)


@pytest.fixture
def parent_volume(shared_parent: Path, volume: Volume) -> Volume:
    """A volume mounted at PARENT/vol, PARENT being a shared mount (torn down after it)."""
    volume.mount(shared_parent / "vol")
    return volume


def test_parent_bind_follows_a_healed_volume(parent_volume: Volume, engine: DockerEngine):
    volume = parent_volume
    assert volume.path is not None
    parent = volume.path.parent
    (volume.path / "before").write_text("written before the crash\n")
    recipe = engine.run_container(
        "--mount", f"type=bind,source={parent},target=/volumes,bind-propagation=rslave",
        engine.image, *IDLE,
    )  # fmt: skip
    # The plain bind of the mount point, which the README says does not survive a restart.
    plain = engine.run_container("-v", f"{volume.path}:/p", engine.image, *IDLE)
    assert engine.exec(recipe, "cat", "/volumes/vol/before").stdout == "written before the crash\n"
    assert engine.exec(plain, "cat", "/p/before").stdout == "written before the crash\n"

    volume.kill()  # SIGKILL of the serving process; returns once the daemon has healed it

    def healed() -> bool:
        seen = engine.exec(recipe, "cat", "/volumes/vol/before", check=False)
        return seen.stdout == "written before the crash\n"

    wait_until(healed, "the healed volume to reach the container through its parent bind")
    engine.exec(recipe, "sh", "-c", "echo after > /volumes/vol/after")
    assert (volume.path / "after").read_text() == "after\n"
    (volume.path / "before").unlink()
    assert engine.exec(recipe, "ls", "/volumes/vol").stdout.split() == ["after"]

    dead = engine.exec(plain, "cat", "/p/before", check=False)
    assert dead.returncode != 0 and "not connected" in dead.stderr, dead


# -- the trial's findings, with hostile containers ------------------------------------------


def _daemon_pid(volume: Volume) -> int:
    return int((run_dir_of(volume.root) / "volfsd.pid").read_text().split()[0])


def test_a_container_cannot_redirect_a_healing_mount(
    parent_volume: Volume, engine: DockerEngine, tmp_path: Path
):
    """Item 1 of the trial: a container that can write the parent (a writable parent bind)
    tries, in a loop, to swap the mount point for a symlink to a host path while the worker
    is killed and the daemon restarted.  The dead mount stays on the path until the new one
    is beneath it, so the swap never succeeds, and nothing is made or mounted on the host."""
    volume = parent_volume
    assert volume.path is not None
    parent, escape = volume.path.parent, tmp_path / "escape-target"
    (volume.path / "f").write_text("kept\n")
    hostile = engine.run_container(
        "--mount", f"type=bind,source={parent},target=/volumes,bind-propagation=rslave",
        engine.image, "sh", "-c",
        f"while true; do rmdir /volumes/vol 2>/dev/null && ln -s {escape} /volumes/vol "
        "&& echo planted; done",
    )  # fmt: skip
    volume.kill()
    volume.kill()
    os.kill(_daemon_pid(volume), signal.SIGKILL)
    assert volume.pid is not None
    os.kill(volume.pid, signal.SIGKILL)  # no daemon: nothing heals, the dead mount stays
    assert wait_gone(volume.pid, 30)
    volfsd("mount", "other", str(tmp_path / "other"), root=volume.root)  # the next daemon
    wait_until(lambda: (volume.path / "f").exists(), "the volume to be back at its path")
    assert "planted" not in engine.docker("logs", hostile).stdout
    assert not escape.exists() and not os.path.islink(volume.path)
    assert (volume.path / "f").read_text() == "kept\n"
    engine.docker("rm", "-f", hostile)


_APPENDER = (
    "n=0; while [ ! -e /volumes/stop ]; do "
    "if echo $n >> /volumes/vol/lines 2>/dev/null; then n=$((n+1)); fi; done; echo $n"
)


def test_writes_from_a_container_during_a_heal_stay_in_the_volume(
    parent_volume: Volume, engine: DockerEngine
):
    """Item 2: a container appending lines through the README's recipe (a read-only parent
    bind) while the worker is killed gets errors during the heal; none of its lines land in
    the host directory under the mount, and it cannot touch the mount point itself."""
    volume = parent_volume
    assert volume.path is not None
    parent = volume.path.parent
    writer = engine.run_container(
        "--mount", f"type=bind,source={parent},target=/volumes,readonly,bind-propagation=rslave",
        engine.image, "sh", "-c", _APPENDER,
    )  # fmt: skip
    wait_until(lambda: (volume.path / "lines").exists(), "the container's first line")
    denied = engine.exec(writer, "rmdir", "/volumes/vol", check=False)
    assert denied.returncode != 0 and "Read-only" in denied.stderr, denied
    for _ in range(3):
        volume.kill()
        size = (volume.path / "lines").stat().st_size
        wait_until(lambda size=size: (volume.path / "lines").stat().st_size > size, "more lines")
    (parent / "stop").touch()
    engine.docker("wait", writer)
    written = int(engine.docker("logs", writer).stdout)
    volume.unmount()
    assert os.listdir(parent / "vol") == [], "writes landed in the directory under the mount"
    volume.mount(parent / "vol")
    numbers = [int(n) for n in (volume.path / "lines").read_text().split()]
    assert sorted(set(numbers)) == list(range(written)) and numbers == sorted(numbers)


def test_a_container_writer_sees_no_error_across_daemon_restarts(
    mnt: Path, volume: Volume, engine: DockerEngine
):
    """Item 3: kill -9 and SIGTERM of the daemon, each followed by a new daemon, leave the
    worker serving: a container writing all along sees no error at all."""
    writer = engine.run_container(
        "-v", f"{mnt}:/p", engine.image, "sh", "-c",
        "n=0; while [ ! -e /p/stop ]; do echo $n >> /p/lines || exit 3; n=$((n+1)); done",
    )  # fmt: skip
    worker = volume.pid
    # `docker run -d` returns before the container's first write (seconds, on a busy host).
    wait_until((mnt / "lines").exists, "the writer to start")
    for signum in (signal.SIGKILL, signal.SIGTERM):
        size = (mnt / "lines").stat().st_size
        os.kill(_daemon_pid(volume), signum)
        wait_until(lambda size=size: (mnt / "lines").stat().st_size > size + 100, "more lines")
        volfsd("ls", root=volume.root)
        volume.mount(mnt)  # a new daemon: it adopts the worker, the path is there already
        assert volume.pid == worker
    (mnt / "stop").touch()
    assert engine.docker("wait", writer).stdout.strip() == "0"
    numbers = [int(n) for n in (mnt / "lines").read_text().split()]
    assert numbers == list(range(len(numbers)))


def test_umount_and_rm_are_refused_while_a_container_uses_the_volume(
    mnt: Path, volume: Volume, engine: DockerEngine
):
    """Item 4: a running container that bound the volume holds it, open files or not; umount
    and rm --force say which container, and --lazy or the container's end lets it go."""
    user = engine.run_container("-v", f"{mnt}:/p", engine.image, *IDLE)
    short = engine.docker("inspect", "-f", "{{.Id}}", user).stdout.strip()[:12]
    for args in (("umount", str(mnt)), ("rm", "--force", volume.name)):
        done = volfsd(*args, root=volume.root, check=False)
        assert done.returncode == 1 and "busy" in done.stderr and short in done.stderr, done
    assert engine.exec(user, "sh", "-c", "echo still > /p/f && cat /p/f").stdout == "still\n"
    engine.docker("rm", "-f", user)
    volume.unmount()
