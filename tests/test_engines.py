"""Cluster engines through the daemon: ``[engines.NAME]`` in its config, ``create --engine``,
``ls`` and ``status`` with engines, mounts of a cluster volume at several paths beside another
host's, one namespace across engines, and no creating on first use while an engine cannot be
reached.  A real PostgreSQL (tests/pg.py), real mounts, the real daemon."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from volfs.docker_driver import CLUSTER_SUFFIX

from conftest import host_at
from helpers import VOLFSD, needs_root, wait_until
from hosts import Host

pytest_plugins = ["pg"]  # its fixtures: pg_server, pg_url, pg_hosts

#: How long another host's change may take to show (generous: a loaded machine).
FEED_WAIT = 10


def _config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "volumes.toml"
    path.write_text(f'[engines.cluster]\nurl = "{url}"\n')
    path.chmod(0o600)  # it holds a URL, which may carry a password
    return path


def _ls(host) -> dict[str, dict]:
    rows = [json.loads(line) for line in host.cli("ls", "--format", "json").stdout.splitlines()]
    return {row["name"]: row for row in rows}


@pytest.mark.expect_log(r"its worker exited \(pid \d+, ")
def test_a_cluster_volume_through_the_daemon(host, tmp_path, pg_url, pg_hosts):
    daemon = host.serve("--config", str(_config(tmp_path, pg_url)))
    host.cli("create", "media", "--engine", "cluster", "--size", "1G")
    host.cli("create", "cache")
    rows = _ls(host)
    assert rows["media"]["engine"] == "cluster" and rows["media"]["size"] == 1 << 30
    assert rows["cache"]["engine"] == "local"
    table = host.cli("ls").stdout.splitlines()
    assert table[0].split()[:2] == ["NAME", "ENGINE"]

    a, b = tmp_path / "a", tmp_path / "b"
    host.cli("mount", "media", str(a))
    host.cli("mount", "media", str(b))  # one worker, two paths: one file system
    (a / "f").write_bytes(b"from this host")
    assert (b / "f").read_bytes() == b"from this host"
    assert sorted(_ls(host)["media"]["mounts"]) == [str(a), str(b)]

    other = pg_hosts("media")  # a second host's worker on the same volume
    assert (other.mountpoint / "f").read_bytes() == b"from this host"
    (other.mountpoint / "g").write_bytes(b"from the other host")
    wait_until(lambda: (b / "g").exists(), "the other host's file here", FEED_WAIT)
    assert (a / "g").read_bytes() == b"from the other host"

    # One namespace: a name is one volume across every engine.
    host.refused("create", "media", words=("exists on engine cluster",))
    host.refused("create", "cache", "--engine", "cluster", words=("exists on engine local",))
    host.refused("create", "x", "--engine", "nowhere", words=("no engine nowhere",))

    status = host.status()
    assert status["engines"] == {"cluster": "ok"}
    assert status["by_name"]["media"]["engine"] == "cluster"

    # A restarted daemon adopts the cluster volume's worker and keeps serving it.
    worker = status["by_name"]["media"]["worker_pid"]
    daemon.send_signal(signal.SIGTERM)
    daemon.wait(timeout=60)
    (a / "during").write_bytes(b"no daemon")
    host.serve("--config", str(_config(tmp_path, pg_url)))
    adopted = host.status()["by_name"]["media"]
    assert adopted["worker_pid"] == worker and adopted["adopted"] is True
    assert adopted["engine"] == "cluster"
    os.kill(worker, signal.SIGKILL)  # healed like a local volume's worker: both paths back

    def healed() -> bool:
        volume = host.status()["by_name"]["media"]
        return volume["worker_pid"] not in (None, worker) and volume["status"] == "mounted"

    wait_until(healed, "the cluster volume healed", timeout=60)
    assert (b / "during").read_bytes() == b"no daemon"
    assert (a / "g").read_bytes() == b"from the other host"

    host.refused("rm", "media", words=("mounted at",))
    host.cli("umount", str(b))
    host.cli("umount", str(a))
    host.refused("rm", "media", words=("unmount it there first",))  # the other host serves it
    other.stop()
    host.cli("rm", "media")
    assert "media" not in _ls(host)


def test_no_creating_on_first_use_while_an_engine_cannot_be_reached(host, tmp_path):
    gone = tmp_path / "no-server-here"
    host.serve("--config", str(_config(tmp_path, f"postgresql:///volfs?host={gone}")))
    mnt = tmp_path / "m"
    host.refused("mount", "photos", str(mnt), words=("cannot be reached", "create it with"))
    assert not (host.root / "volumes" / "photos").exists(), "no local volume made in its place"
    assert "cannot reach" in host.status()["engines"]["cluster"]
    assert "engine cluster:" in host.cli("status").stdout
    host.cli("create", "photos")  # an explicit create says where: local
    host.cli("mount", "photos", str(mnt))
    (mnt / "f").write_bytes(b"here")
    assert _ls(host)["photos"]["engine"] == "local"
    host.cli("umount", str(mnt))


@needs_root("Docker and the plugin's socket need root")
def test_docker_names_a_cluster_volume_through_the_global_driver(host, tmp_path, pg_url,
                                                                  pg_hosts, engine):  # fmt: skip
    """A daemon with a cluster engine serves a second driver, NAME-cluster, of Docker's global
    scope: its volumes are the cluster engine's, and a container's writes reach another host."""
    local = f"volfs-t{os.getpid()}-eng"
    cluster = local + CLUSTER_SUFFIX
    host.serve("--config", str(_config(tmp_path, pg_url)), "--docker-plugin", local)
    try:
        engine.docker("volume", "create", "-d", cluster, "--opt", "size=64M", "media")
        seen = json.loads(engine.docker("volume", "inspect", "media").stdout)[0]
        assert seen["Driver"] == cluster and seen["Scope"] == "global"
        assert seen["Status"]["size"] == 64 << 20
        assert _ls(host)["media"]["engine"] == "cluster"
        engine.docker("volume", "create", "-d", local, "cache")  # the local driver: local
        assert _ls(host)["cache"]["engine"] == "local"
        listed = engine.docker("volume", "ls", "--format", "{{.Driver}} {{.Name}}").stdout
        assert f"{cluster} media" in listed and f"{local} cache" in listed
        assert f"{local} media" not in listed, "one name, one driver"

        engine.run("-v", "media:/data", engine.image, "sh", "-c", "echo from a container > /data/f")
        other = pg_hosts("media")
        assert (other.mountpoint / "f").read_bytes() == b"from a container\n"
        (other.mountpoint / "g").write_bytes(b"from the other host\n")
        out = engine.run("-v", "media:/data", engine.image, "cat", "/data/g").stdout
        assert out == "from the other host\n"
        refused = engine.docker("volume", "create", "-d", cluster, "--opt", "labels=a=b", "x",
                                check=False)  # fmt: skip
        assert refused.returncode != 0 and "unknown option 'labels'" in refused.stderr
        other.stop()
    finally:
        engine.remove_containers()
        for name in ("media", "cache"):
            engine.docker("volume", "rm", "-f", name, check=False)


def test_export_into_import_moves_a_volume_onto_the_cluster(host, tmp_path, pg_url, pg_hosts):
    """`volfsd export NAME | volfsd import NAME2 --engine cluster -`: the tree, modes, links
    and xattrs on the cluster, read by a host of it; the local volume stays as it was."""
    mnt = tmp_path / "m"
    host.cli("mount", "photos", str(mnt))
    (mnt / "2024").mkdir()
    (mnt / "2024" / "a.jpg").write_bytes(os.urandom(300_000))
    (mnt / "2024" / "a.jpg").chmod(0o640)
    (mnt / "latest").symlink_to("2024/a.jpg")
    os.link(mnt / "2024" / "a.jpg", mnt / "hard")
    os.setxattr(mnt / "2024" / "a.jpg", "user.camera", b"x100")
    want = (mnt / "2024" / "a.jpg").read_bytes()
    host.cli("umount", str(mnt))
    config = _config(tmp_path, pg_url)
    volfsd = " ".join(shlex.quote(word) for word in VOLFSD)
    moved = subprocess.run(
        ["bash", "-o", "pipefail", "-c", f"{volfsd} export photos | {volfsd} import photos2 "
         f"--engine cluster --config {shlex.quote(str(config))} -"],
        env=host.env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert moved.returncode == 0, moved.stderr
    other = pg_hosts("photos2")
    got = other.mountpoint
    assert (got / "2024" / "a.jpg").read_bytes() == want
    assert (got / "2024" / "a.jpg").stat().st_mode & 0o777 == 0o640
    assert os.readlink(got / "latest") == "2024/a.jpg"
    assert (got / "hard").stat().st_ino == (got / "2024" / "a.jpg").stat().st_ino
    assert (got / "hard").stat().st_nlink == 2
    assert os.getxattr(got / "2024" / "a.jpg", "user.camera") == b"x100"
    other.stop()
    again = host.refused("import", "photos", "--engine", "cluster", "--config", str(config),
                         str(tmp_path))  # fmt: skip
    assert "exists on engine local" in again


def test_a_declared_volume_on_the_cluster_is_made_there_and_mounted(host, tmp_path, pg_url):
    mnt = tmp_path / "media"
    config = _config(tmp_path, pg_url)
    with open(config, "a") as f:
        f.write(f'[volumes.media]\nengine = "cluster"\nsize = "1G"\npaths = ["{mnt}"]\n')
    host.serve("--config", str(config))  # answers while it still mounts what it declares
    row = wait_until(lambda: _ls(host)["media"]["mounts"] and _ls(host)["media"],
                     "the declared volume mounted")  # fmt: skip
    assert (row["engine"], row["size"], row["mounts"]) == ("cluster", 1 << 30, [str(mnt)])
    (mnt / "f").write_bytes(b"declared")
    host.refused("resize", "media", "2G", words=("cluster", "not"))
    host.cli("umount", str(mnt))


@pytest.fixture
def second_host(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Host]:
    """Another host: a daemon with a store root, runtime dir and config of its own."""
    (tmp_path / "host-b").mkdir()
    yield from host_at(tmp_path / "host-b", request.node)


def test_two_daemons_serve_one_volume(host, second_host, tmp_path, pg_url):
    """Two hosts, each its own daemon, store and mount point, one database: a volume created
    on one is mounted by name on the other; a closed file is current on the other host, an
    fsynced one too, a rename moves for both, and a file unlinked on one host stays readable
    through a descriptor the other holds open."""
    a_host, b_host = host, second_host
    a_host.serve("--config", str(_config(tmp_path, pg_url)))
    b_host.serve("--config", str(_config(b_host.tmp, pg_url)))
    a_host.cli("create", "media", "--engine", "cluster")
    a, b = tmp_path / "a", b_host.tmp / "b"
    a_host.cli("mount", "media", str(a))
    b_host.cli("mount", "media", str(b))  # found on the cluster: mounted, not made locally
    assert not (b_host.root / "volumes" / "media").exists()
    assert _ls(b_host)["media"]["mounts"] == [str(b)]

    (a / "closed").write_bytes(b"one")
    assert (b / "closed").read_bytes() == b"one"  # close-to-open
    fd = os.open(a / "synced", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"fsynced, still open")
        os.fsync(fd)
        wait_until(lambda: (b / "synced").exists() and (b / "synced").read_bytes()
                   == b"fsynced, still open", "the fsynced file on b", FEED_WAIT)  # fmt: skip
    finally:
        os.close(fd)
    (a / "closed").rename(a / "renamed")
    wait_until(lambda: (b / "renamed").exists() and not (b / "closed").exists(),
               "the rename on b", FEED_WAIT)  # fmt: skip

    held = os.open(b / "renamed", os.O_RDONLY)
    try:
        (a / "renamed").unlink()
        wait_until(lambda: not (b / "renamed").exists(), "the unlink on b", FEED_WAIT)
        assert os.pread(held, 100, 0) == b"one", "open on b, so kept for b"
    finally:
        os.close(held)
    b_host.cli("umount", str(b))
    a_host.cli("umount", str(a))


PJDFSTEST = Path(__file__).resolve().parent / "pjdfstest.sh"


@pytest.mark.slow
@needs_root("pjdfstest needs root")
def test_pjdfstest_on_a_cluster_volume(pg_url):
    """pjdfstest, the POSIX suite, on a volume of the PostgreSQL engine (tests/pjdfstest.sh
    with VOLFS_PJDFSTEST_ENGINE_URL): the same rules as on the local store."""
    env = {**os.environ, "VOLFS_PJDFSTEST_ENGINE_URL": pg_url}
    done = subprocess.run([str(PJDFSTEST)], env=env, capture_output=True, text=True,
                          timeout=3600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    assert "Result: PASS" in done.stdout
