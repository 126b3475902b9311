"""The control protocol's edge: typed requests, error codes in replies, the config schema."""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path

import msgpack
import pytest

from volfs import requests
from volfs.config import LOCAL_ENGINE, load_config, redact_url
from volfs.errors import ErrorCode, VolfsError


def frame(message: object) -> bytes:
    body = msgpack.packb(message)
    return struct.pack(">I", len(body)) + body


# -- requests --------------------------------------------------------------------------------


def _decode(cmd: str, args: object) -> object:
    return requests.decode(requests.DAEMON_COMMANDS, cmd, args)


def test_requests_are_typed_and_parsed_at_the_edge():
    request = _decode("create", {"name": "a", "size": "10G", "labels": {"k": "v"}})
    assert request == requests.CreateRequest("a", 10 << 30, {"k": "v"}, 0)
    owned = _decode("create", {"name": "a", "uid": "33", "gid": 33, "mode": "0750"})
    assert (owned.uid, owned.gid, owned.mode) == (33, 33, 0o750)
    assert _decode("create", {"name": "a", "uid": None}).uid is None  # None: not given
    mount = _decode("mount", {"name": "a", "mountpoint": "/srv//x/", "read_only": True})
    assert mount == requests.MountRequest("a", Path("/srv/x"), True, 0, 0)
    assert _decode("inspect", {"names": ["a", "b"]}) == requests.InspectRequest(["a", "b"])
    assert _decode("resize", {"name": "a", "size": 4096}).inodes is None


@pytest.mark.parametrize(
    "cmd, args, words",
    [
        ("nope", {}, "unknown command 'nope'"),
        ("ls", [1], "args must be a map"),
        ("create", {}, "missing argument 'name'"),
        ("umount", {"mountpoint": "/", "extra": 1}, "unknown argument 'extra'"),
        ("rm", {"name": 5}, "argument 'name' must be a str"),
        ("create", {"name": "y", "size": True}, "argument 'size' must be a str or int"),
        ("create", {"name": "y", "uid": 33.0}, "argument 'uid' must be a str or int or None"),
        ("create", {"name": "y", "gid": [33]}, "argument 'gid' must be a str or int or None"),
        ("create", {"name": "y", "mode": False}, "argument 'mode' must be a str or int or None"),
        ("mount", {"name": "z", "mountpoint": "/x", "read_only": 1}, "'read_only' must be a bool"),
        ("inspect", {"names": "steady"}, "argument 'names' must be a list of str"),
    ],
)
def test_malformed_requests_are_one_line_invalid(cmd, args, words):
    with pytest.raises(VolfsError) as info:
        _decode(cmd, args)
    assert info.value.code == ErrorCode.INVALID
    assert str(info.value) == f"malformed request: {words}" or words in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "cmd, args, words",
    [
        ("create", {"name": "Bad Name"}, "invalid volume name"),
        ("create", {"name": "y", "size": "10g"}, "invalid size"),
        ("create", {"name": "y", "labels": {"k": 1}}, "labels must be KEY=VALUE"),
        ("mount", {"name": "x", "mountpoint": "rel"}, "relative"),
        ("resize", {"name": "x", "size": "1M", "inodes": "-3"}, "invalid inode limit"),
        ("create", {"name": "y", "uid": "www-data"}, "id -u www-data"),
        ("create", {"name": "y", "gid": -1}, "invalid gid"),
        ("create", {"name": "y", "mode": 0o17777}, "invalid mode 0o17777"),
        ("create", {"name": "y", "mode": "rwx"}, "invalid mode 'rwx'"),
        ("snapshot", {"snapshot": "x"}, "names no snapshot"),
        ("snapshot", {"snapshot": "x@../y"}, "invalid snapshot name"),
        ("clone", {"snapshot": "x@s", "name": "a@b"}, "invalid volume name"),
        ("rollback", {"snapshot": "X@s"}, "invalid volume name"),
        ("inspect", {"names": ["a@"]}, "invalid snapshot name"),
    ],
)
def test_values_are_parsed_by_the_cli_parsers(cmd, args, words):
    with pytest.raises(VolfsError, match=words) as info:
        _decode(cmd, args)
    assert info.value.code == ErrorCode.INVALID


def test_every_request_encodes_to_what_decodes_to_it():
    samples = [
        requests.CreateRequest("a", 1 << 20, {"k": "v"}, 10),
        requests.CreateRequest("a"),
        requests.CreateRequest("a", uid=0, gid=33, mode=0o2775),
        requests.LsRequest(),
        requests.InspectRequest(["a"]),
        requests.StatusRequest(),
        requests.MountRequest("a", Path("/m"), True, 4096, 0),
        requests.UmountRequest(Path("/m"), lazy=True),
        requests.UmountAllRequest(),
        requests.RmRequest("a", force=True),
        requests.ResizeRequest("a", 4096, None),
        requests.LsRequest(snapshots=True),
        requests.InspectRequest(["a", "a@s"]),
        requests.MountRequest("a@s", Path("/m"), True),
        requests.RmRequest("a@s"),
        requests.RmRequest("a", recursive=True),
        requests.SnapshotRequest("a@s"),
        requests.CloneRequest("a@s", "b", 1 << 20),
        requests.CloneRequest("a@s", "b"),
        requests.RollbackRequest("a@s"),
        requests.StatsRequest(["a"]),
    ]
    assert {type(s) for s in samples} == set(requests.DAEMON_COMMANDS.values())
    for sample in samples:
        wire = msgpack.unpackb(msgpack.packb(requests.encode(sample)))
        assert _decode(wire["cmd"], wire["args"]) == sample
    # Arguments left at their defaults are left out: an older daemon need not know them.
    assert requests.encode(requests.CreateRequest("a"))["args"] == {"name": "a"}
    assert requests.encode(requests.CreateRequest("a", uid=0))["args"] == {"name": "a", "uid": 0}
    # set_limits always sends both: workers from before requests.py require both.
    limits = requests.encode(requests.SetLimitsRequest(4096, None))
    assert limits == {"cmd": "set_limits", "args": {"size": 4096, "inodes": None}}


def test_the_wire_names_stay():
    """The command and argument names are the protocol: older CLIs send these."""
    names = {
        cmd: [f.name for f in dataclasses.fields(cls)]
        for cmd, cls in requests.DAEMON_COMMANDS.items()
    }
    assert names == {
        "create": ["name", "size", "labels", "inodes", "uid", "gid", "mode", "engine"],
        "ls": ["snapshots"],
        "inspect": ["names"],
        "status": [],
        "mount": ["name", "mountpoint", "read_only", "size", "inodes", "create"],
        "umount": ["mountpoint", "lazy"],
        "umount_all": [],
        "rm": ["name", "force", "recursive"],
        "resize": ["name", "size", "inodes"],
        "snapshot": ["snapshot"],
        "clone": ["snapshot", "name", "size"],
        "rollback": ["snapshot"],
        "stats": ["names"],
    }
    assert sorted(requests.WORKER_COMMANDS) == ["set_limits", "stats", "status", "take_snapshot"]


# -- codes in replies, end to end ------------------------------------------------------------


def test_replies_carry_codes(host, tmp_path):
    host.cli("mount", "v", str(tmp_path / "m"))
    cases = [
        ({"cmd": "nope", "args": {}}, ErrorCode.INVALID),
        ({"cmd": "rm", "args": {"name": "ghost"}}, ErrorCode.NOT_FOUND),
        ({"cmd": "rm", "args": {"name": "v"}}, ErrorCode.BUSY),
        ({"cmd": "umount", "args": {"mountpoint": str(tmp_path)}}, ErrorCode.NOT_MOUNTED),
    ]
    for message, code in cases:
        reply = host.request(frame(message))
        assert reply is not None and reply["ok"] is False, reply
        assert reply["code"] == code.value, reply
        assert reply["error"] and "\n" not in reply["error"]
    # An old CLI's request (every argument, by its old names) still works.
    old = {"name": "v", "mountpoint": str(tmp_path / "m"), "read_only": False, "size": 0}
    assert host.request(frame({"cmd": "mount", "args": old}))["ok"] is True
    host.cli("umount", str(tmp_path / "m"))


def test_worker_replies_carry_codes(host, tmp_path):
    import trio

    from volfs import workerctl

    host.cli("mount", "v", str(tmp_path / "m"))
    sock = workerctl.socket_path(host.run, "v")

    async def ask() -> None:
        status = await workerctl.call(sock, requests.WorkerStatusRequest())
        assert status["name"] == "v" and status["protocol"] == workerctl.PROTOCOL
        with pytest.raises(workerctl.WorkerRefused) as info:
            await workerctl.call(sock, requests.SetLimitsRequest(size=-1, inodes=None))
        assert "\n" not in str(info.value)

    trio.run(ask)
    reply = _raw_worker_request(sock, frame({"cmd": "nope", "args": {}}))
    assert reply["ok"] is False and reply["code"] == ErrorCode.INVALID.value
    host.cli("umount", str(tmp_path / "m"))


def _raw_worker_request(sock: Path, raw: bytes) -> dict:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(sock))
        conn.sendall(raw)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return msgpack.unpackb(data[4:], raw=False)


# -- the config schema ---------------------------------------------------------------------


def _config(tmp_path: Path, text: str, mode: int = 0o644) -> Path:
    path = tmp_path / "volumes.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_config_keys_are_the_create_flags(tmp_path):
    path = _config(tmp_path, '[volumes.a]\nsize = "1G"\nlabels = { k = "v" }\ninodes = "10"\n'
                   'uid = 33\ngid = "33"\nmode = "2775"\n')  # fmt: skip
    volume = load_config(path).volumes["a"]
    assert (volume.size, volume.labels, volume.inodes) == (1 << 30, {"k": "v"}, 10)
    assert (volume.uid, volume.gid, volume.mode) == (33, 33, 0o2775)
    unowned = load_config(_config(tmp_path, "[volumes.b]\nmode = 0o750\n")).volumes["b"]
    assert (unowned.uid, unowned.gid, unowned.mode) == (None, None, 0o750)  # TOML's octal
    assert volume.paths == () and volume.read_only is False


@pytest.mark.parametrize(
    "text, words",
    [
        ("[volumes.x]\ncolour = 1\n", ("volumes.toml", "[volumes.x]", "'colour'", "allowed keys")),
        ("colour = 1\n", ("volumes.toml", "'colour'", "top level", "docker_plugin")),
        ('docker_plugin = "Bad"\n', ("volumes.toml", "docker_plugin", "invalid Docker driver")),
        ('[volumes.x]\nsize = "10g"\n', ("volume 'x'", "invalid size")),
        ("[volumes.x]\nlabels = { k = 1 }\n", ("volume 'x'", "labels must be")),
        ('[volumes.x]\nuid = "www-data"\n', ("volume 'x'", "id -u www-data")),
        ("[volumes.x]\ngid = -1\n", ("volume 'x'", "invalid gid")),
        ('[volumes.x]\nmode = "rwx"\n', ("volume 'x'", "invalid mode")),
        ("[volumes.x]\nmode = true\n", ("volume 'x'", "invalid mode")),
    ],
)
def test_config_errors_name_file_table_and_key(tmp_path, text, words):
    with pytest.raises(VolfsError) as info:
        load_config(_config(tmp_path, text))
    for word in words:
        assert word in str(info.value), info.value


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_config_others_can_write_is_refused(tmp_path, mode):
    with pytest.raises(VolfsError, match="writable by other users"):
        load_config(_config(tmp_path, "[volumes.x]\n", mode))


def test_config_with_credentials_must_not_be_readable_by_others(tmp_path):
    text = '[engines.cluster]\nurl = "postgresql://volfs:secret@db.internal/volfs"\n'
    with pytest.raises(VolfsError, match="readable by other users"):
        load_config(_config(tmp_path, text, 0o644))
    engine = load_config(_config(tmp_path, text, 0o600)).engines["cluster"]
    assert engine.url == "postgresql://volfs:secret@db.internal/volfs"
    assert redact_url(engine.url) == "postgresql://volfs:***@db.internal/volfs"
    assert redact_url("postgresql://volfs@db/v") == "postgresql://volfs@db/v"
    assert load_config(_config(tmp_path, "[volumes.x]\n", 0o644)).volumes  # no secrets: fine


def test_config_engines_and_the_engine_of_a_declared_volume(tmp_path):
    text = ('[engines.cluster]\nurl = "postgres://volfs@db/volfs"\n'
            '[volumes.media]\nengine = "cluster"\n[volumes.cache]\n')  # fmt: skip
    config = load_config(_config(tmp_path, text, 0o600))
    assert config.volumes["media"].engine == "cluster"
    assert config.volumes["cache"].engine == LOCAL_ENGINE


@pytest.mark.parametrize(
    "text, words",
    [
        ('[engines.c]\nurl = "mysql://db/v"\n', ("engine 'c'", "PostgreSQL connection URI")),
        ("[engines.c]\n", ("engine 'c'", "needs url")),
        ('[engines.c]\nurl = "postgresql://db/v"\nssl = 1\n', ("'ssl'", "allowed keys are url")),
        ('[engines.local]\nurl = "postgresql://db/v"\n', ("[engines.local]", "another name")),
        ('[volumes.x]\nengine = "nowhere"\n', ("volume 'x'", "[engines.nowhere]")),
        ('[engines."b a d"]\nurl = "postgresql://db/v"\n', ("engine 'b a d'",)),
    ],
)
def test_config_engine_errors(tmp_path, text, words):
    with pytest.raises(VolfsError) as info:
        load_config(_config(tmp_path, text, 0o600))
    for word in words:
        assert word in str(info.value), info.value


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file away")
def test_config_of_another_user_is_refused(tmp_path):
    path = _config(tmp_path, "[volumes.x]\n")
    os.chown(path, 65534, 65534)
    with pytest.raises(VolfsError, match="belongs to uid 65534"):
        load_config(path)
