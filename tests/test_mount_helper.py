"""mount(8), umount(8) and fstab lines through the real util-linux tools and a real daemon.

mount(8) looks for its helper in /sbin only, so the `mount_helper` fixture puts a two-line
`/sbin/mount.volfs` there for the module's tests, running this checkout, and removes it after,
also on failure.  A helper someone else put there (a real install, another test run) is left
alone and the tests are skipped.  fstab lines are read from a file of the test's own
(`mount -T`), never from the host's /etc/fstab.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from volfs import mount_helper, mounts
from volfs.errors import VolfsError

from helpers import alive, needs_root, wait_gone, wait_until
from hosts import Host

HELPER = Path("/sbin/mount.volfs")
MARK = "# installed by the volfs tests, pid "


@pytest.fixture(scope="module")
def mount_helper_installed() -> Iterator[Path]:
    """/sbin/mount.volfs running this checkout's helper, for the module's tests."""
    if os.geteuid() != 0:
        pytest.skip("mount(8) runs helpers from /sbin: installing one needs root")
    if HELPER.exists() or HELPER.is_symlink():
        text = HELPER.read_text(errors="replace") if HELPER.is_file() else ""
        holder = text.partition(MARK)[2].split("\n")[0]
        if not holder.isdigit() or alive(int(holder)):
            pytest.skip(f"{HELPER} is there already (not this run's): left alone")
        HELPER.unlink()  # left by a test run that was killed
    script = f'#!/bin/sh\n{MARK}{os.getpid()}\nexec {sys.executable} -m volfs.mount_helper "$@"\n'
    HELPER.write_text(script)
    try:
        HELPER.chmod(0o755)
        yield HELPER
    finally:
        HELPER.unlink()


@pytest.fixture
def mount_host(mount_helper_installed: Path, host: Host) -> Host:
    return host


def run(host: Host, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run util-linux's *argv* (mount, umount) with the test host's store and run dir."""
    return subprocess.run(argv, env=host.env, capture_output=True, text=True, timeout=180)


def ok(host: Host, *argv: str) -> None:
    done = run(host, *argv)
    assert done.returncode == 0, done


def refused(done: subprocess.CompletedProcess[str], rc: int, *words: str) -> None:
    """mount(8) failed with *rc* and one line of the helper's holding *words*."""
    assert done.returncode == rc, done
    assert done.stderr.startswith("mount.volfs: ") and done.stderr.count("\n") == 1, done.stderr
    for word in words:
        assert word in done.stderr, done.stderr


def paths(host: Host, name: str) -> list[str]:
    volume = host.status()["by_name"].get(name)
    return [m["path"] for m in volume["mounts"]] if volume else []


def remembered(host: Host) -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        return [e[1] for e in msgpack.unpackb((host.run / "mounts.msgpack").read_bytes())]
    return []


def restart_daemon(host: Host, tmp_path: Path) -> None:
    """kill -9 of the daemon (its workers serve on), then a new one, started by a mount."""
    daemon = host.daemon_pid()
    os.kill(daemon, signal.SIGKILL)
    assert wait_gone(daemon, 30)
    (tmp_path / "restarted").mkdir(exist_ok=True)
    ok(host, "mount", "-t", "volfs", "restarted", str(tmp_path / "restarted"))


# -- mount(8) --------------------------------------------------------------------------------


@needs_root("mount(8)'s helpers and bind mounts need root")
def test_mount_and_umount(mount_host, tmp_path):
    """`mount -t volfs` makes a volume (of a size) and returns with it live; `-o ro` is
    read-only; `umount` of one path keeps the other, of the last ends the worker, and the
    paths stay unmounted after the daemon restarts."""
    host, rw, ro = mount_host, tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ok(host, "mount", "-t", "volfs", "media", str(rw), "-o", "size=10M")
    (rw / "f").write_bytes(b"at once")  # mounted when mount(8) returned
    assert host.status()["by_name"]["media"]["status"] == "mounted"
    inspect = host.cli("inspect", "media").stdout
    assert '"size": 10485760' in inspect, inspect
    entry = mounts.find_mount(rw)
    assert entry is not None and entry.fstype == "fuse.volfs" and entry.source == "media"
    ok(host, "mount", "-t", "volfs", "-o", "ro", "media", str(ro))
    assert (ro / "f").read_bytes() == b"at once"
    with pytest.raises(OSError) as info:
        (ro / "g").write_bytes(b"no")
    assert info.value.errno == errno.EROFS
    worker = host.worker_pid("media")

    ok(host, "umount", str(ro))
    wait_until(lambda: paths(host, "media") == [str(rw)], "the daemon to let go of ro")
    assert (rw / "f").read_bytes() == b"at once" and host.worker_pid("media") == worker
    assert str(ro) not in remembered(host)
    ok(host, "umount", str(rw))
    assert wait_gone(worker, 30), "the worker of a volume without paths still runs"
    assert "media" not in host.status()["by_name"] and remembered(host) == []

    restart_daemon(host, tmp_path)
    assert mounts.find_mount(rw) is None and mounts.find_mount(ro) is None
    assert "media" not in host.status()["by_name"]
    ok(host, "umount", str(tmp_path / "restarted"))


@needs_root("mount(8)'s helpers and bind mounts need root")
def test_fstab_lines(mount_host, tmp_path):
    """fstab lines with mount(8)'s and systemd's options: `mount -a` mounts all but the
    `noauto` one, which `mount DIR` mounts; umount(8) takes them away for good."""
    host, auto, manual = mount_host, tmp_path / "auto", tmp_path / "manual"
    auto.mkdir(), manual.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(
        "# volfs volumes\n"
        f"photos {auto} volfs defaults,_netdev,nofail 0 0\n"
        f"scratch {manual} volfs noauto,x-systemd.requires=volfsd.service,"
        "x-systemd.after=volfsd.service,comment=scratch,size=5M,inodes=100 0 0\n"
    )
    ok(host, "mount", "-a", "-T", str(fstab))
    assert mounts.find_mount(auto) is not None and mounts.find_mount(manual) is None
    ok(host, "mount", "--fstab", str(fstab), str(manual))
    (manual / "f").write_bytes(b"x")
    scratch = host.cli("inspect", "scratch").stdout
    assert '"size": 5242880' in scratch and '"inodes_limit": 100' in scratch, scratch
    ok(host, "mount", "-a", "-T", str(fstab))  # mounted already: mount(8) leaves them be
    assert sorted(remembered(host)) == sorted([str(auto), str(manual)])
    workers = [host.worker_pid("photos"), host.worker_pid("scratch")]
    ok(host, "umount", str(auto), str(manual))
    for worker in workers:
        assert wait_gone(worker, 30)
    assert remembered(host) == []


@needs_root("mount(8)'s helpers need root")
def test_refusals_are_one_line(mount_host, tmp_path):
    host, mnt = mount_host, tmp_path / "m"
    mnt.mkdir()
    volume = ("mount", "-t", "volfs", "v", str(mnt))
    refused(run(host, *volume, "-o", "bogus"), 1, "unknown option bogus", "accepted:", "size=")
    refused(run(host, *volume, "-o", "size=lots"), 1, "size")
    refused(run(host, *volume, "-o", "user"), 1, "user", "root")
    refused(run(host, "mount", "-t", "volfs", "no/such", str(mnt)), 1, "invalid volume name")
    refused(run(host, "mount", "-t", "volfs", "-N", "/proc/self/ns/mnt", "v", str(mnt)), 1, "-N")
    assert mounts.find_mount(mnt) is None
    assert not (host.root / "volumes" / "v").exists()


# -- the watcher: what counts as a user's unmount ---------------------------------------------


@pytest.mark.expect_log(r"its worker exited \(pid \d+, ")
@needs_root("bind mounts need root")
def test_healing_is_not_an_unmount(mount_host, tmp_path):
    """A killed worker's dead binds and the swap beneath them are no unmount: both paths come
    back, stay remembered, and come back after a daemon restart too; a path unmounted by
    umount(8) does not come back at the next heal."""
    host, a, b = mount_host, tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    ok(host, "mount", "-t", "volfs", "heal", str(a))
    ok(host, "mount", "-t", "volfs", "heal", str(b))
    (a / "f").write_bytes(b"acknowledged")
    worker = host.worker_pid("heal")
    os.kill(worker, signal.SIGKILL)
    wait_until(lambda: host.status()["by_name"]["heal"]["restarts"] == 1
               and (b / "f").read_bytes() == b"acknowledged",
               "the volume healed", timeout=60, ignore=(OSError, KeyError))  # fmt: skip
    assert paths(host, "heal") == [str(a), str(b)]
    assert sorted(remembered(host)) == [str(a), str(b)]
    restart_daemon(host, tmp_path)
    assert paths(host, "heal") == [str(a), str(b)]
    assert (a / "f").read_bytes() == b"acknowledged"

    ok(host, "umount", str(b))  # and a path unmounted by umount(8) is not healed back
    wait_until(lambda: paths(host, "heal") == [str(a)], "the daemon to let go of b")
    os.kill(host.worker_pid("heal"), signal.SIGKILL)
    wait_until(lambda: host.status()["by_name"]["heal"]["restarts"] == 1
               and (a / "f").read_bytes() == b"acknowledged",
               "the adopted volume healed", timeout=60, ignore=(OSError, KeyError))  # fmt: skip
    assert mounts.find_mount(b) is None and paths(host, "heal") == [str(a)]


@needs_root("bind mounts need root")
def test_unmounted_while_no_daemon_ran(mount_host, tmp_path):
    """A path unmounted while the daemon was down (its worker served on) is not brought back
    by the next daemon; the last one lets the worker end."""
    host, a = mount_host, tmp_path / "a"
    a.mkdir()
    ok(host, "mount", "-t", "volfs", "orphan", str(a))
    daemon, worker = host.daemon_pid(), host.worker_pid("orphan")
    os.kill(daemon, signal.SIGKILL)
    assert wait_gone(daemon, 30)
    ok(host, "umount", str(a))
    restart_daemon(host, tmp_path)
    assert mounts.find_mount(a) is None
    assert wait_gone(worker, 30)
    assert str(a) not in remembered(host)


# -- the helper's arguments, as mount(8) gives them ----------------------------------------------


def test_arguments_as_mount_gives_them():
    # Measured: `mount -t volfs -o defaults,_netdev,nofail,x-systemd.requires=volfsd.service
    # NAME DIR` runs the helper so (defaults becomes rw; x-* are left out).
    got = mount_helper.parse_args(["v", "/srv/v", "-s", "-n", "-v", "-o", "rw,_netdev,nofail"])
    assert (got.name, got.mountpoint, got.read_only, got.verbose) == ("v", Path("/srv/v"),
                                                                       False, True)  # fmt: skip
    got = mount_helper.parse_args(["v", "/m", "-o", "ro,size=1G,inodes=10", "-t", "volfs"])
    assert (got.read_only, got.size, got.inodes) == (True, 1 << 30, 10)
    assert mount_helper.parse_args(["v", "/m", "-f", "-o", "rw"]).fake
    assert mount_helper.parse_args(["v", "/m", "-s", "-o", "rw,relatime"]).size == 0  # sloppy
    for argv in (
        ["v"],
        ["v", "relative"],
        ["v", "/m", "-x"],
        ["v", "/m", "-o"],
        ["v", "/m", "-o", "rw,noexec,nosuid,nodev,user"],
        ["v", "/m", "-o", "nodev"],
    ):
        with pytest.raises(VolfsError) as info:
            mount_helper.parse_args(argv)
        assert mount_helper.exit_status(info.value) == 1, argv


GENERATOR = Path("/lib/systemd/system-generators/systemd-fstab-generator")


@pytest.mark.skipif(not GENERATOR.exists(), reason="no systemd-fstab-generator")
def test_readme_fstab_example(tmp_path):
    """README's fstab lines: options the helper accepts, and mount units that systemd orders
    after volfsd.service, under remote-fs.target (not local-fs.target, which volfsd.service
    starts after)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("In `/etc/fstab`", 1)[1].split("```", 2)[1]
    lines = [line for line in block.splitlines() if line.split() and line[0] != "#"]
    assert len(lines) == 2, block
    for line in lines:
        name, where, fstype, options = line.split()[:4]
        assert fstype == "volfs"
        mount_helper.apply_options(mount_helper.Invocation(name, Path(where)), options.split(","))
    fstab = tmp_path / "fstab"
    fstab.write_text("\n".join(lines) + "\n")
    out = tmp_path / "units"
    out.mkdir()
    env = {**os.environ, "SYSTEMD_FSTAB": str(fstab), "SYSTEMD_PROC_CMDLINE": ""}
    subprocess.run([GENERATOR, out, out, out], env=env, check=True, timeout=60)
    for line in lines:
        unit = line.split()[1].strip("/").replace("/", "-")  # plain paths: no escapes
        text = (out / f"{unit}.mount").read_text()
        assert "After=volfsd.service" in text and "local-fs.target" not in text, text
    assert (out / "remote-fs.target.wants" / "srv-photos.mount").exists()
