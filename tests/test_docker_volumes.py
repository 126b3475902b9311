"""volfs volumes named by Docker: the plugin driven by the session's real Docker engine.

Each test has a driver name of its own (the ``docker_plugin`` fixture): Docker finds the
plugin by its socket in /run/docker/plugins, which every engine on the host shares.  The
protocol itself, without an engine, is tested in test_docker_plugin.py.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from volfs import mounts

from conftest import Plugin
from docker_engine import DockerEngine
from helpers import alive, needs_root, wait_until

pytestmark = needs_root("Docker and the plugin's socket need root")

IDLE = ("sleep", "600")


def inspect(engine: DockerEngine, volume: str) -> dict:
    return json.loads(engine.docker("volume", "inspect", volume).stdout)[0]


def volfs_row(plugin: Plugin, name: str) -> dict:
    return json.loads(plugin.host.cli("inspect", name).stdout)[0]


def create(engine: DockerEngine, plugin: Plugin, name: str, *opts: str) -> None:
    options = [word for opt in opts for word in ("--opt", opt)]
    engine.docker("volume", "create", "-d", plugin.name, *options, name)


def test_create_with_options_and_inspect(docker_plugin: Plugin, engine: DockerEngine):
    plugin = docker_plugin
    create(engine, plugin, "media", "size=16M", "inodes=500", "labels=team=ci,env=test")
    seen = inspect(engine, "media")
    assert seen["Driver"] == plugin.name and seen["Scope"] == "local"
    assert seen["Status"]["size"] == 16 << 20 and seen["Status"]["containers"] == 0
    row = volfs_row(plugin, "media")
    assert (row["size"], row["inodes_limit"], row["labels"]) == (
        16 << 20, 500, {"team": "ci", "env": "test"},
    )  # fmt: skip
    refused = engine.docker("volume", "create", "-d", plugin.name, "--opt", "colour=red", "x",
                            check=False)  # fmt: skip
    assert refused.returncode != 0
    assert "unknown option 'colour'" in refused.stderr and "size, uid, gid" in refused.stderr
    refused = engine.docker("volume", "create", "-d", plugin.name, "Upper", check=False)
    assert refused.returncode != 0 and "invalid volume name" in refused.stderr, refused


def test_a_volume_cloned_from_a_snapshot(docker_plugin: Plugin, engine: DockerEngine, tmp_path):
    """`--opt from=NAME@SNAP`: a test copy of production data, as a Docker volume."""
    plugin, host = docker_plugin, docker_plugin.host
    create(engine, plugin, "prod")
    engine.run("-v", "prod:/data", engine.image, "sh", "-c", "echo orders > /data/db")
    host.cli("snapshot", "prod@nightly")
    engine.run("-v", "prod:/data", engine.image, "sh", "-c", "echo later > /data/db")
    create(engine, plugin, "staging", "from=prod@nightly", "size=32M")
    create(engine, plugin, "staging", "from=prod@nightly")  # Docker asks again: a no-op
    seen = engine.run("-v", "staging:/data", engine.image, "cat", "/data/db").stdout
    assert seen == "orders\n"
    engine.run("-v", "staging:/data", engine.image, "sh", "-c", "echo test > /data/db")
    assert engine.run("-v", "prod:/data", engine.image, "cat", "/data/db").stdout == "later\n"
    row = volfs_row(plugin, "staging")
    assert row["origin"] == "prod@nightly" and row["size"] == 32 << 20
    for opts, words in ((("from=prod@none",), "no such snapshot"),
                        (("from=prod@nightly", "uid=33"), "does not go with 'from'"),
                        (("from=prod",), "names no snapshot")):  # fmt: skip
        options = [word for opt in opts for word in ("--opt", opt)]
        refused = engine.docker("volume", "create", "-d", plugin.name, *options, "other",
                                check=False)  # fmt: skip
        assert refused.returncode != 0 and words in refused.stderr, refused
    engine.docker("volume", "rm", "staging")
    host.cli("rm", "-r", "prod")


def test_owner_options_for_a_non_root_container(docker_plugin: Plugin, engine: DockerEngine):
    """WordPress runs as uid 33: a volume created for it takes its uploads at once."""
    plugin = docker_plugin
    create(engine, plugin, "uploads", "uid=33", "gid=33", "mode=0750")
    status = inspect(engine, "uploads")["Status"]
    assert (status["uid"], status["gid"], status["mode"]) == (33, 33, "0750")
    target = "/var/www/html/wp-content/uploads"
    web = engine.run_container("-v", f"uploads:{target}", "--user", "33:33", engine.image, *IDLE)
    engine.exec(web, "sh", "-c", f"echo jpeg > {target}/a.jpg")
    assert engine.exec(web, "stat", "-c", "%u:%g %a", target).stdout == "33:33 750\n"
    denied = engine.run("-v", "uploads:/p", "--user", "1000:1000", engine.image, "ls", "/p",
                        check=False)  # fmt: skip
    assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied
    refused = engine.docker("volume", "create", "-d", plugin.name, "--opt", "uid=www-data", "x",
                            check=False)  # fmt: skip
    assert refused.returncode != 0 and "id -u www-data" in refused.stderr, refused


def test_two_containers_share_files_and_locks(docker_plugin: Plugin, engine: DockerEngine):
    plugin = docker_plugin
    create(engine, plugin, "shared")
    a = engine.run_container("-v", "shared:/p", engine.image, *IDLE)
    b = engine.run_container("-v", "shared:/p", engine.image, *IDLE)
    status = inspect(engine, "shared")["Status"]
    assert status["containers"] == 2 and len(status["mounts"]) == 1  # one mount for both
    engine.exec(a, "sh", "-c", "echo from-a > /p/a")
    assert engine.exec(b, "cat", "/p/a").stdout == "from-a\n"
    engine.exec(b, "sh", "-c", "mv /p/a /p/moved && echo from-b > /p/b")
    assert engine.exec(a, "ls", "/p").stdout.split() == ["b", "moved"]

    holder = engine.run_container("-v", "shared:/p", engine.image, "flock", "/p/lock", "sh",
                                  "-c", "touch /p/held; sleep 600")  # fmt: skip
    wait_until(lambda: engine.exec(a, "ls", "/p/held", check=False).returncode == 0,
               "the third container to take the lock")  # fmt: skip
    tried = engine.exec(b, "flock", "-n", "/p/lock", "true", check=False)
    assert tried.returncode == 1, tried  # held by the other container: one file system
    engine.docker("rm", "-f", holder)
    wait_until(
        lambda: engine.exec(b, "flock", "-n", "/p/lock", "true", check=False).returncode == 0,
        "the lock to be free once its holder is gone",
    )
    engine.docker("rm", "-f", a, b)
    wait_until(lambda: not inspect(engine, "shared")["Mountpoint"], "the last Unmount")
    assert inspect(engine, "shared")["Status"]["containers"] == 0


def test_the_size_limit_holds_inside_a_container(docker_plugin: Plugin, engine: DockerEngine):
    plugin = docker_plugin
    create(engine, plugin, "small", "size=8M")
    fill = "dd if=/dev/zero of=/p/big bs=1M count=16; echo rc=$?"
    done = engine.run("-v", "small:/p", engine.image, "sh", "-c", fill, check=False)
    assert "No space left on device" in done.stderr, done
    assert "rc=1" in done.stdout
    engine.run("-v", "small:/p", engine.image, "rm", "/p/big")  # and room comes back
    engine.run("-v", "small:/p", engine.image, "dd", "if=/dev/zero", "of=/p/again", "bs=1M",
               "count=4")  # fmt: skip
    row = volfs_row(plugin, "small")
    assert row["used"] <= 8 << 20


def test_read_only_binds(docker_plugin: Plugin, engine: DockerEngine):
    plugin = docker_plugin
    create(engine, plugin, "docs")
    writer = engine.run_container("-v", "docs:/p", engine.image, *IDLE)
    engine.exec(writer, "sh", "-c", "echo v1 > /p/readme")
    done = engine.run("-v", "docs:/p:ro", engine.image, "sh", "-c",
                      "cat /p/readme; touch /p/x", check=False)  # fmt: skip
    assert done.stdout == "v1\n" and "Read-only file system" in done.stderr, done
    assert engine.exec(writer, "ls", "/p").stdout.split() == ["readme"]


def test_volumes_made_with_the_cli_are_docker_volumes(docker_plugin: Plugin, engine: DockerEngine):
    plugin = docker_plugin
    plugin.host.cli("create", "from-cli", "--size", "16M")
    listed = engine.docker("volume", "ls", "--filter", f"driver={plugin.name}",
                           "--format", "{{.Driver}} {{.Name}}").stdout.split("\n")  # fmt: skip
    assert f"{plugin.name} from-cli" in listed
    done = engine.run("-v", "from-cli:/p", engine.image, "sh", "-c", "echo hi > /p/f; cat /p/f")
    assert done.stdout == "hi\n"
    assert inspect(engine, "from-cli")["Status"]["size"] == 16 << 20


def test_rm_is_refused_while_a_container_uses_the_volume(
    docker_plugin: Plugin, engine: DockerEngine
):
    plugin = docker_plugin
    create(engine, plugin, "data")
    user = engine.run_container("-v", "data:/p", engine.image, *IDLE)
    engine.exec(user, "sh", "-c", "echo precious > /p/f")
    short = engine.docker("inspect", "-f", "{{.Id}}", user).stdout.strip()[:12]
    refused = engine.docker("volume", "rm", "data", check=False)
    assert refused.returncode != 0 and "in use" in refused.stderr, refused
    plugin.host.refused("rm", "data", words=("mounted",))
    forced = plugin.host.refused("rm", "--force", "data", words=("busy",))
    assert short in forced  # named by its container
    assert engine.exec(user, "cat", "/p/f").stdout == "precious\n"
    engine.docker("rm", "-f", user)
    engine.docker("volume", "rm", "data")
    assert "data" not in plugin.host.cli("ls", "-q").stdout.split()
    assert not (plugin.host.root / "volumes" / "data").exists()


def test_daemon_restarts_while_a_container_writes(docker_plugin: Plugin, engine: DockerEngine):
    """A daemon restart is a hand-off: the worker goes on serving and the container notices
    nothing; the new daemon knows the container's mount, and its Unmount ends the volume."""
    plugin, host = docker_plugin, docker_plugin.host
    create(engine, plugin, "busy")
    writer = engine.run_container(
        "-v", "busy:/p", engine.image, "sh", "-c",
        "n=0; while [ ! -e /p/stop ]; do echo $n >> /p/lines || exit 3; n=$((n+1)); done",
    )  # fmt: skip
    path = Path(inspect(engine, "busy")["Mountpoint"])
    for signum in (signal.SIGTERM, signal.SIGKILL):
        wait_until(lambda: (path / "lines").exists(), "the writer to start")
        size = (path / "lines").stat().st_size
        daemon = host.daemon_pid()
        os.kill(daemon, signum)
        wait_until(lambda d=daemon: not alive(d), "the daemon to end", timeout=60)
        wait_until(lambda s=size: (path / "lines").stat().st_size > s + 100, "more lines")
        host.serve("--docker-plugin", plugin.name)
        assert inspect(engine, "busy")["Status"]["containers"] == 1
    (path / "stop").touch()
    assert engine.docker("wait", writer).stdout.strip() == "0"
    # Docker unmounts when the container stops: the new daemon got that Unmount.
    wait_until(lambda: mounts.find_mount(path) is None, "the Unmount after the restarts")
    lines = engine.run("-v", "busy:/p", engine.image, "cat", "/p/lines").stdout.split()
    assert [int(n) for n in lines] == list(range(len(lines)))


@pytest.mark.expect_log(r"its worker exited", r"keep the dead mount")
def test_a_replaced_mount_is_named_until_its_containers_restart(
    docker_plugin: Plugin, engine: DockerEngine
):
    """Docker binds a volume into a container privately: when a worker dies and is replaced,
    the running container keeps the dead mount.  status and inspect say so, and a restart of
    the container brings it the new mount."""
    plugin, host = docker_plugin, docker_plugin.host
    create(engine, plugin, "healed")
    user = engine.run_container("-v", "healed:/p", engine.image, *IDLE)
    engine.exec(user, "sh", "-c", "echo kept > /p/f")
    worker = host.worker_pid("healed")
    os.kill(worker, signal.SIGKILL)
    wait_until(lambda: host.status()["by_name"]["healed"]["status"] == "mounted"
               and host.worker_pid("healed") != worker, "the volume to heal")  # fmt: skip
    problems = host.status()["by_name"]["healed"]["problems"]
    assert any("replaced" in p and "1 container" in p for p in problems), problems
    assert any("replaced" in p for p in inspect(engine, "healed")["Status"]["problems"])
    shown = host.cli("status").stdout
    assert "healed: its mount was replaced" in shown, shown
    dead = engine.exec(user, "cat", "/p/f", check=False)
    assert "Transport endpoint is not connected" in dead.stderr, dead
    engine.docker("restart", "-t", "0", user)
    assert engine.exec(user, "cat", "/p/f").stdout == "kept\n"
    wait_until(lambda: not host.status()["by_name"]["healed"]["problems"], "the problem to clear")


def test_compose_services_share_a_volume(docker_plugin: Plugin, engine: DockerEngine, tmp_path):
    plugin = docker_plugin
    compose = tmp_path / "compose.yaml"
    compose.write_text(
        "version: '3.8'\n"
        "services:\n"
        f"  web:\n    image: {engine.image}\n    network_mode: none\n"
        "    command: [sh, -c, 'echo from-web > /srv/index.html; sleep 600']\n"
        "    volumes: ['media:/srv']\n"
        f"  thumb:\n    image: {engine.image}\n    network_mode: none\n"
        "    command: [sleep, '600']\n"
        "    volumes: ['media:/data']\n"
        "volumes:\n"
        f"  media:\n    driver: {plugin.name}\n    driver_opts: {{ size: 32M }}\n"
    )
    project = f"p{os.getpid()}"
    try:
        engine.compose(compose, project, "up", "-d")
        volume = f"{project}_media"
        assert volfs_row(plugin, volume)["size"] == 32 << 20
        thumb = engine.compose(compose, project, "ps", "-q", "thumb").stdout.strip()
        wait_until(lambda: engine.exec(thumb, "cat", "/data/index.html", check=False).stdout
                   == "from-web\n", "the web service's file in the thumb service")  # fmt: skip
        # -t 0: sleep as a container's pid 1 ignores SIGTERM, and down would wait 10 s for it.
        engine.compose(compose, project, "down", "-v", "-t", "0")
        assert volume not in plugin.host.cli("ls", "-q").stdout.split()
    finally:
        engine.compose(compose, project, "down", "-v", "-t", "0", check=False)


def test_image_contents_are_copied_into_an_empty_volume(
    docker_plugin: Plugin, engine: DockerEngine
):
    """Docker's copy-up works on volfs volumes as on its own: mounted over a directory of the
    image, an empty volume first gets that directory's files (and with nocopy, none)."""
    plugin = docker_plugin
    create(engine, plugin, "seeded")
    engine.run("-v", "seeded:/bin", engine.image, "/bin/busybox", "true")
    listed = engine.run("-v", "seeded:/x", engine.image, "ls", "/x").stdout.split()
    assert "busybox" in listed and "sh" in listed
    target = f"type=volume,src=bare,dst=/usr/bin,volume-driver={plugin.name},volume-nocopy"
    engine.run("--mount", target, engine.image, "true")
    assert engine.run("-v", "bare:/x", engine.image, "ls", "/x").stdout == ""
