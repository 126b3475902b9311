"""The Docker volume plugin's protocol, spoken by hand over its socket: no Docker engine here.

What dockerd sends is plain HTTP with JSON bodies (tests/plugin_client.py sends the same);
these tests check every endpoint's answers and what a malformed or hostile client gets.  The
tests with a real engine are in test_docker_volumes.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
from pathlib import Path

import msgpack
import pytest

from volfs import mounts
from volfs.config import PLUGIN_ENV
from volfs.docker_plugin import MAX_BODY, socket_path
from volfs.remembered import CLAIMS_FILE, boot_clock

import plugin_client
from conftest import Plugin
from helpers import VOLFSD, alive, needs_root, wait_until
from hosts import Host

pytestmark = [
    needs_root("the plugin's socket lives in /run/docker/plugins and it bind-mounts"),
    pytest.mark.mount_namespaces,  # unshare -m: stands in for containers and services
]


def ls(plugin: Plugin) -> dict[str, dict]:
    rows = plugin.host.cli("ls", "--format", "json").stdout.splitlines()
    return {r["name"]: r for r in map(json.loads, rows)}


def test_activate_capabilities_and_an_empty_list(plugin):
    assert plugin.call("Plugin.Activate") == (200, {"Implements": ["VolumeDriver"]})
    assert plugin.call("VolumeDriver.Capabilities", {}) == (
        200,
        {"Capabilities": {"Scope": "local"}},
    )
    assert plugin.call("VolumeDriver.List", {}) == (200, {"Volumes": [], "Err": ""})
    mode = stat.S_IMODE(os.stat(plugin.socket).st_mode)
    assert mode == 0o600, oct(mode)  # who can connect can destroy volumes


def test_create_mount_share_unmount_remove(plugin):
    opts = {"size": "64M", "inodes": "1000", "labels": "team=ci,env=test"}
    assert plugin.call("VolumeDriver.Create", {"Name": "media", "Opts": opts})[0] == 200
    assert plugin.call("VolumeDriver.Create", {"Name": "media", "Opts": opts})[0] == 200  # again
    row = ls(plugin)["media"]
    assert (row["size"], row["inodes_limit"]) == (64 << 20, 1000)
    assert row["labels"] == {"team": "ci", "env": "test"}
    assert plugin.call("VolumeDriver.Path", {"Name": "media"}) == (
        200,
        {"Mountpoint": "", "Err": ""},
    )

    status, first = plugin.call("VolumeDriver.Mount", {"Name": "media", "ID": "a" * 64})
    assert status == 200, first
    path = Path(first["Mountpoint"])
    entry = mounts.find_mount(path)
    assert entry is not None and entry.fstype == mounts.FSTYPE
    (path / "photo.jpg").write_bytes(b"jpeg")
    # A second container: the same mount, the same files.
    second = plugin.call("VolumeDriver.Mount", {"Name": "media", "ID": "b" * 64})[1]
    assert second["Mountpoint"] == str(path)
    assert plugin.call("VolumeDriver.Path", {"Name": "media"})[1]["Mountpoint"] == str(path)
    status, got = plugin.call("VolumeDriver.Get", {"Name": "media"})
    assert status == 200
    volume = got["Volume"]
    assert volume["Name"] == "media" and volume["Mountpoint"] == str(path)
    assert volume["Status"]["containers"] == 2 and volume["Status"]["size"] == 64 << 20
    assert volume["Status"]["mounts"] == [str(path)] and volume["CreatedAt"].endswith("Z")

    def used() -> int:
        return plugin.call("VolumeDriver.Get", {"Name": "media"})[1]["Volume"]["Status"]["used"]

    wait_until(lambda: used() >= 4, "the usage the worker saves to show the file", timeout=30)

    status, refused = plugin.call("VolumeDriver.Remove", {"Name": "media"})
    assert status == 409 and "in use by 2 container" in refused["Err"], refused
    assert plugin.call("VolumeDriver.Unmount", {"Name": "media", "ID": "a" * 64})[0] == 200
    assert mounts.find_mount(path) is not None  # one container still holds it
    assert (path / "photo.jpg").read_bytes() == b"jpeg"
    assert plugin.call("VolumeDriver.Unmount", {"Name": "media", "ID": "b" * 64})[0] == 200
    assert mounts.find_mount(path) is None  # the last one unmounts
    wait_until(lambda: not plugin.host.status()["volumes"], "the worker to end", timeout=30)
    assert plugin.call("VolumeDriver.Remove", {"Name": "media"})[0] == 200
    assert "media" not in ls(plugin)


def test_cli_volumes_are_listed_and_mountable(plugin):
    plugin.host.cli("create", "made-by-cli", "--size", "16M")
    status, listed = plugin.call("VolumeDriver.List")
    assert status == 200
    assert [v["Name"] for v in listed["Volumes"]] == ["made-by-cli"]
    mounted = plugin.call("VolumeDriver.Mount", {"Name": "made-by-cli", "ID": "c1"})[1]
    assert mounts.find_mount(mounted["Mountpoint"]) is not None
    # `volfsd rm` is refused while Docker has it mounted, like any mounted volume.
    plugin.host.refused("rm", "made-by-cli", words=("mounted",))
    plugin.call("VolumeDriver.Unmount", {"Name": "made-by-cli", "ID": "c1"})


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"Name": "Media"}, 400, ("invalid volume name",)),
        ({"Name": "x" * 64}, 400, ("invalid volume name",)),
        ({"Name": "../etc"}, 400, ("invalid volume name",)),
        ({"Name": 5}, 400, ("Name must be a non-empty string",)),
        ({}, 400, ("Name must be",)),
        ({"Name": "v", "Opts": {"colour": "red"}}, 400, ("'colour'", "size, uid, gid")),
        ({"Name": "v", "Opts": {"size": "10g"}}, 400, ("invalid size", "10G")),
        ({"Name": "v", "Opts": {"inodes": "-1"}}, 400, ("inode limit",)),
        ({"Name": "v", "Opts": {"labels": "novalue"}}, 400, ("KEY=VALUE",)),
        ({"Name": "v", "Opts": ["size=1G"]}, 400, ("Opts must be",)),
        ({"Name": "v", "Opts": {"mode": "rwx"}}, 400, ("mode",)),
        ({"Name": "v", "Opts": {"gid": "-1"}}, 400, ("gid",)),
    ],
)
def test_create_refuses_bad_names_and_options(plugin, body, status, words):
    got_status, reply = plugin.call("VolumeDriver.Create", body)
    assert got_status == status, reply
    assert set(reply) == {"Err"} and "\n" not in reply["Err"]
    for word in words:
        assert word in reply["Err"], reply
    assert ls(plugin) == {}


def test_verbs_on_a_volume_that_does_not_exist(plugin):
    for endpoint in ("Mount", "Get", "Remove"):
        status, reply = plugin.call(f"VolumeDriver.{endpoint}", {"Name": "ghost", "ID": "x"})
        assert status == 404 and "no such volume: ghost" in reply["Err"], (endpoint, reply)
    # Docker may repeat an Unmount (or send one for a mount a restart forgot): not an error.
    assert plugin.call("VolumeDriver.Unmount", {"Name": "ghost", "ID": "x"})[0] == 200


def test_create_with_options_that_differ_is_refused(plugin):
    plugin.call("VolumeDriver.Create", {"Name": "db", "Opts": {"size": "16M"}})
    status, reply = plugin.call("VolumeDriver.Create", {"Name": "db", "Opts": {"size": "32M"}})
    assert status == 409 and "already exists" in reply["Err"], reply
    # What `docker run -v db:/x` sends for a volume it does not know yet: no options.
    assert plugin.call("VolumeDriver.Create", {"Name": "db", "Opts": None})[0] == 200


def test_malformed_and_hostile_requests(plugin):
    sock = plugin.socket
    cases = [
        (b"[1", 400, "not JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b'"text"', 400, "JSON object"),
        (b"[" * 60000, 400, "not JSON"),  # deeper than json may go
        (b"{" + b" " * (MAX_BODY + 10) + b"}", 413, "over"),
    ]
    for body, status, word in cases:
        got, reply = plugin.call("VolumeDriver.Get", body)
        assert got == status and word in reply["Err"], (body[:20], reply)
    got, reply = plugin.call("VolumeDriver.Nonsense", {})
    assert got == 404 and "unknown endpoint" in reply["Err"]
    conn = plugin_client.UnixHTTPConnection(sock)
    try:
        got, reply = plugin_client.request(conn, "VolumeDriver.List", method="GET")
        assert got == 405 and "POST" in reply["Err"]
        # The connection is kept alive: Docker's client reuses it.
        assert plugin_client.request(conn, "VolumeDriver.List", {})[0] == 200
    finally:
        conn.close()
    # Not HTTP at all, headers without end, a body shorter than announced: an answer or a
    # closed connection, and the daemon serves on.
    answer = plugin_client.raw(sock, b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400"), answer[:80]
    cut_short = [
        b"POST /Plugin.Activate HTTP/1.1\r\nHost: x\r\n",
        b"POST /Plugin.Activate HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{}",
    ]
    for data in cut_short:
        answer = plugin_client.raw(sock, data)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer[:80]
    answer = plugin_client.raw(
        sock, b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 40000 + b"\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 431") or answer == b"", answer[:80]
    many = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(50)]
    try:
        for idle in many:  # connections that say nothing hold nothing else up
            idle.connect(str(sock))
        assert plugin.call("Plugin.Activate")[0] == 200
    finally:
        for idle in many:
            idle.close()
    assert alive(plugin.host.daemon_pid())
    assert plugin.call("Plugin.Activate")[0] == 200


def test_claims_survive_a_daemon_restart(plugin):
    host = plugin.host
    plugin.call("VolumeDriver.Create", {"Name": "kept"})
    path = Path(plugin.call("VolumeDriver.Mount", {"Name": "kept", "ID": "m1"})[1]["Mountpoint"])
    (path / "f").write_bytes(b"before")
    daemon = host.daemon_pid()
    os.kill(daemon, 15)  # a hand-off: the worker and the mount stay
    wait_until(lambda: not alive(daemon), "the daemon to stop", timeout=60)
    assert not plugin.socket.exists()  # removed by the daemon that made it
    assert (path / "f").read_bytes() == b"before"
    host.serve("--docker-plugin", plugin.name)
    status = plugin.call("VolumeDriver.Get", {"Name": "kept"})[1]["Volume"]["Status"]
    assert status["containers"] == 1
    assert plugin.call("VolumeDriver.Unmount", {"Name": "kept", "ID": "m1"})[0] == 200
    assert mounts.find_mount(path) is None


def test_claims_nothing_holds_are_dropped(plugin):
    """A claim whose container ended without an Unmount (dockerd killed) pins nothing for
    ever: once past the grace and with nothing holding the volume, it is dropped."""
    host = plugin.host
    plugin.call("VolumeDriver.Create", {"Name": "orphan"})
    path = Path(plugin.call("VolumeDriver.Mount", {"Name": "orphan", "ID": "m1"})[1]["Mountpoint"])
    daemon = host.daemon_pid()
    os.kill(daemon, 15)
    wait_until(lambda: not alive(daemon), "the daemon to stop", timeout=60)
    claims = host.run / CLAIMS_FILE
    entries = msgpack.unpackb(claims.read_bytes())
    assert [e[:2] for e in entries] == [["orphan", "m1"]]
    claims.write_bytes(msgpack.packb([[*e[:2], boot_clock() - 3600, e[3]] for e in entries]))
    host.serve("--docker-plugin", plugin.name)
    wait_until(lambda: mounts.find_mount(path) is None, "the orphaned claim to go", timeout=30)
    assert (
        plugin.call("VolumeDriver.Get", {"Name": "orphan"})[1]["Volume"]["Status"]["containers"]
        == 0
    )
    assert plugin.call("VolumeDriver.Remove", {"Name": "orphan"})[0] == 200


@pytest.mark.expect_log(r"served by process \d+")
def test_a_socket_another_process_serves_is_not_taken(host, tmp_path):
    name = f"volfs-t{os.getpid()}-held"
    path = socket_path(name)
    holder = subprocess.Popen(
        ["python3", "-c", "import socket,sys,time; s=socket.socket(socket.AF_UNIX); "
         "s.bind(sys.argv[1]); s.listen(); print('ready', flush=True); time.sleep(120)",
         str(path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        done = host.cli("serve", "--docker-plugin", name, check=False)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done
        assert f"process {holder.pid} (python3)" in done.stderr, done.stderr
        assert "--docker-plugin" in done.stderr
        assert stat.S_ISSOCK(path.lstat().st_mode)  # still there: not ours to remove
    finally:
        holder.kill()
        holder.wait()
    # Now stale: nobody listens on it, so a daemon replaces it.
    served = Plugin(host)
    served.name, served.socket = name, path
    host.serve("--docker-plugin", name)
    assert served.call("Plugin.Activate")[0] == 200
    host.cleanup()
    assert not path.exists()


def test_a_file_that_is_not_a_socket_is_not_removed(host):
    name = f"volfs-t{os.getpid()}-file"
    path = socket_path(name)
    path.write_text("someone's file")
    try:
        done = host.cli("serve", "--docker-plugin", name, check=False)
        assert done.returncode == 1 and "is not a socket" in done.stderr, done
        assert path.read_text() == "someone's file"
    finally:
        path.unlink()


def test_plugin_off_bad_names_and_the_config_key(host):
    host.serve("--docker-plugin", "off")
    assert not socket_path("off").exists()
    host.cleanup()
    host.refused("serve", "--docker-plugin", "Bad/Name", words=("invalid Docker driver",))
    config = host.tmp / "volumes.toml"
    name = f"volfs-t{os.getpid()}-conf"
    config.write_text(f'docker_plugin = "{name}"\n')
    config.chmod(0o644)
    # The config key wins over $VOLFS_DOCKER_PLUGIN (conftest sets it to off for every test
    # daemon), and the flag over both.
    host.serve("--config", str(config))
    served = Plugin(host)
    served.name, served.socket = name, socket_path(name)
    assert served.call("Plugin.Activate")[0] == 200
    host.cleanup()
    host.serve("--config", str(config), "--docker-plugin", "off")
    assert not served.socket.exists()


# -- found in review: claims through heals, errors, propagation, the default name ----


def age_claims(host: Host) -> None:
    """Make every claim older than the grace, as if its Mount came an hour ago."""
    claims = host.run / CLAIMS_FILE
    entries = msgpack.unpackb(claims.read_bytes())
    claims.write_bytes(msgpack.packb([[*e[:2], boot_clock() - 3600, e[3]] for e in entries]))


def restart_daemon(plugin: Plugin) -> None:
    """A hand-off (SIGTERM, then serve again): the new daemon reconciles claims at start."""
    daemon = plugin.host.daemon_pid()
    os.kill(daemon, signal.SIGTERM)
    wait_until(lambda: not alive(daemon), "the daemon to stop", timeout=60)
    plugin.host.serve("--docker-plugin", plugin.name)


def containers(plugin: Plugin, name: str) -> int:
    return plugin.call("VolumeDriver.Get", {"Name": name})[1]["Volume"]["Status"]["containers"]


@pytest.mark.expect_log(r"its worker exited", r"keep the dead mount")
def test_claims_held_through_a_replaced_mount_are_kept(plugin):
    """After a heal, a container holds the *old* (dead) mount: reconcile must look for holders
    of that device too, or it drops the claims, `status` and `docker volume inspect` stop
    naming the containers that see ENOTCONN, and Docker's path goes."""
    host = plugin.host
    plugin.call("VolumeDriver.Create", {"Name": "healed"})
    path = Path(plugin.call("VolumeDriver.Mount", {"Name": "healed", "ID": "m1"})[1]["Mountpoint"])
    # A container, by stand-in: a mount namespace of its own with a private copy of the
    # volume's mount (Docker binds volumes rprivate), which a heal leaves holding the dead one.
    holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "600"])
    ours = os.readlink("/proc/self/ns/mnt")
    try:
        wait_until(lambda: os.readlink(f"/proc/{holder.pid}/ns/mnt") != ours
                   and Path(f"/proc/{holder.pid}/comm").read_text().strip() == "sleep",
                   "the stand-in's namespace", ignore=(OSError,))  # fmt: skip
        age_claims(host)  # a container that has run for an hour
        assert containers(plugin, "healed") == 1
        worker = host.worker_pid("healed")
        os.kill(worker, signal.SIGKILL)
        wait_until(lambda: host.status()["by_name"]["healed"]["status"] == "mounted"
                   and host.worker_pid("healed") != worker, "the volume to heal")  # fmt: skip
        assert any("replaced" in p for p in host.status()["by_name"]["healed"]["problems"])
        # Reconcile runs at a daemon's start (and every minute): a verb that takes the
        # driver's lock after it is answered once that reconcile is done.
        restart_daemon(plugin)
        assert plugin.call("VolumeDriver.Create", {"Name": "other"})[0] == 200
        assert containers(plugin, "healed") == 1, "the claim of a running container was dropped"
        problems = host.status()["by_name"]["healed"]["problems"]
        assert any("replaced" in p for p in problems), problems
        assert mounts.find_mount(path) is not None
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.expect_log(r"reconciling Docker's mount claims failed")
def test_an_error_in_reconcile_does_not_end_the_daemon(plugin):
    """Reconcile runs in the daemon's nursery: an exception there (here an OSError writing
    the claims file, as a full /run gives) is logged and tried again later; the daemon, its
    control socket and its plugin serve on."""
    host = plugin.host
    plugin.call("VolumeDriver.Create", {"Name": "orphan"})
    plugin.call("VolumeDriver.Mount", {"Name": "orphan", "ID": "m1"})
    daemon = host.daemon_pid()
    os.kill(daemon, signal.SIGTERM)
    wait_until(lambda: not alive(daemon), "the daemon to stop", timeout=60)
    age_claims(host)  # orphaned: its container went without an Unmount
    # The next write of the claims file fails (EISDIR here; ENOSPC on a full /run).
    blocker = host.run / (CLAIMS_FILE + ".tmp")
    blocker.mkdir()
    try:
        try:
            host.serve("--docker-plugin", plugin.name)
        except AssertionError as exc:  # it ended at once: reconcile runs at start
            pytest.fail(f"reconcile's OSError ended the daemon: {str(exc)[-300:]}")
        daemon = host.daemon_pid()
        try:
            status = plugin.call("VolumeDriver.Create", {"Name": "other"})[0]
        except OSError as exc:  # the daemon went while answering
            status = f"no answer: {exc!r}"
        assert status == 200
        assert alive(daemon), "reconcile's OSError ended the daemon"
    finally:
        blocker.rmdir()


def test_a_cli_started_daemon_of_another_store_does_not_need_the_default_driver(
    plugin_host: Host, host: Host, tmp_path: Path
):
    """Any root daemon serves driver `volfs` unless told otherwise, the one `volfsd mount`
    starts for another store too: with the system's daemon serving `volfs`, a root user's
    `volfsd mount` on a scratch store fails (and its message names a flag of `serve` the user
    never ran).  Had the scratch daemon started first (say during `systemctl restart
    volfsd`), it would have taken Docker's driver name, and the system's daemon would fail."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = dict(host.env)
    env.pop(PLUGIN_ENV, None)  # as a root shell has it: unset
    done = subprocess.run([*VOLFSD, "mount", "scratch", str(mnt)], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr


@pytest.fixture
def plugin_host(tmp_path: Path) -> Host:
    """A daemon of a store of its own serving the default driver name, as volfsd.service."""
    system = Host(tmp_path / "system")
    (tmp_path / "system").mkdir()
    if Path("/run/docker/plugins/volfs.sock").exists():
        pytest.skip("a volfs driver is served on this machine")
    system.serve("--docker-plugin", "volfs")
    try:
        yield system
    finally:
        system.cleanup()


def test_a_namespace_the_host_propagates_to_does_not_pin_claims(tmp_path: Path):
    """On a systemd host every mount is shared, and each service with PrivateTmp,
    ProtectSystem, ... runs in a mount namespace that is a slave of the host's: the bind at
    RUN_DIR/docker/NAME propagates into it.  users_of counts such a namespace as one holding
    the volume (as a container would), so an orphaned claim is never dropped: the volume
    stays mounted and `docker volume rm` is refused for good.  Here a tmpfs made shared
    stands in for systemd's /run, and `unshare --propagation slave` for a service."""
    shared = tmp_path / "shared"
    shared.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "review", str(shared)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(shared)], check=True)
        service = subprocess.Popen(["unshare", "-m", "--propagation", "slave", "sleep", "600"])
        host = Host(shared)
        try:
            plugin = Plugin(host)
            host.serve("--docker-plugin", plugin.name)
            plugin.call("VolumeDriver.Create", {"Name": "pinned"})
            plugin.call("VolumeDriver.Mount", {"Name": "pinned", "ID": "m1"})
            age_claims(host)  # dockerd died an hour ago: no Unmount will come
            restart_daemon(plugin)  # reconciles at start
            assert plugin.call("VolumeDriver.Create", {"Name": "other"})[0] == 200
            assert containers(plugin, "pinned") == 0, "a service's namespace pins the claim"
        finally:
            service.kill()
            service.wait()
            host.cleanup()
    finally:
        subprocess.run(["umount", "-l", str(shared)], check=False)
