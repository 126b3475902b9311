"""The Docker volume plugin: Docker's plugin protocol on a unix socket, a front end of the daemon.

Docker finds a plugin by its socket, ``/run/docker/plugins/NAME.sock`` for driver NAME, and
calls it with HTTP POSTs whose path names the endpoint (``/VolumeDriver.Mount``) and whose
body is a JSON object; every reply is a JSON object, ``{"Err": "one line"}`` with a non-200
status on failure.  The HTTP is h11's (a parser and state machine, no I/O), driven here on
trio streams; the verbs are docker_driver.py's.

Whoever may connect can mount and destroy volumes, so the socket is born 0600 and a peer other
than root or the daemon's own user is refused (``SO_PEERCRED``).  A request is read within
:data:`REQUEST_TIMEOUT` seconds with a body of at most :data:`MAX_BODY` bytes; whatever a client
sends gets a reply or a closed connection, and the daemon lives on.

A socket at the path that a live process serves (another daemon of another store, say) is
never taken over: `listen` refuses, naming the process.  One that nobody listens on is stale
and replaced.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import h11
import trio

from volfs import control
from volfs.control_server import serve_connections
from volfs.docker_driver import DockerDriver
from volfs.errors import ErrorCode, VolfsError
from volfs.http_serving import HttpError, next_event, read_body, send_response

log = logging.getLogger(__name__)

PLUGIN_DIR = Path("/run/docker/plugins")
#: The largest request body read; Docker's are a few hundred bytes.
MAX_BODY = 64 * 1024
#: Headers beyond this are refused (h11 buffers at most this much of an incomplete event).
MAX_HEADERS = 16 * 1024
#: How long a client may take to send one whole request.
REQUEST_TIMEOUT = 30.0
#: How long a kept-alive connection may stay idle between requests.
IDLE_TIMEOUT = 120.0
CONTENT_TYPE = "application/vnd.docker.plugins.v1.2+json"

#: The HTTP status of a refusal, by its code; anything else is 500.
STATUS = {
    ErrorCode.INVALID: 400,
    ErrorCode.PERMISSION: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.EXISTS: 409,
    ErrorCode.BUSY: 409,
    ErrorCode.ALREADY_SERVED: 409,
    ErrorCode.NOT_MOUNTED: 409,
    ErrorCode.NO_SPACE: 507,
    ErrorCode.UNAVAILABLE: 503,
}


def socket_path(driver_name: str) -> Path:
    return PLUGIN_DIR / f"{driver_name}.sock"


class PluginSocket:
    """The plugin's listening socket at *path*, and the inode of the file it made there."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = _listen(path)
        self.inode = os.stat(path).st_ino

    def close(self) -> None:
        """Stop listening; remove the socket file if it is still ours (not a successor's)."""
        self.listener.close()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self.inode:
                self.path.unlink()


def _listen(path: Path) -> socket.socket:
    """A socket listening at *path* (0600), replacing a stale socket there.

    Refused (``ALREADY_SERVED``) when a live process listens at *path*, and (``EXISTS``) when
    something other than a socket is there: neither is ours to remove.
    """
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise VolfsError(
            f"cannot serve the Docker plugin at {path}: {exc.strerror}; run volfsd as root, "
            "or use --docker-plugin off",
            ErrorCode.PERMISSION,
        ) from None
    # Two daemons starting at once could each find the socket stale, and the second unlink
    # the first's new one: the check, the unlink and the bind go under a lock on the
    # directory (flock: Docker takes none there).
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        _remove_stale(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            listener.bind(str(path))
        except OSError as exc:
            listener.close()
            raise VolfsError(f"cannot serve the Docker plugin at {path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        listener.listen(64)
        return listener
    finally:
        os.close(dir_fd)  # and the lock with it


def _remove_stale(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise VolfsError(
            f"{path} exists and is not a socket: remove it, or use --docker-plugin NAME to "
            "serve another driver name",
            ErrorCode.EXISTS,
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(2)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise VolfsError(f"cannot check the socket {path}: {exc.strerror}") from None
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # nobody listens: left by a process that died
        log.info("replaced the stale Docker plugin socket %s", path)
        return
    finally:
        probe.close()
    raise VolfsError(
        f"the Docker plugin socket {path} is served by {_listener_of(path)}: stop it, or "
        "serve another driver name (volfsd serve --docker-plugin NAME, or off; for the daemon "
        "volfsd mount starts, VOLFS_DOCKER_PLUGIN=NAME or off)",
        ErrorCode.ALREADY_SERVED,
    )


def _listener_of(path: Path) -> str:
    """The process listening on the unix socket bound at *path*, as "process PID (COMM)".

    /proc/net/unix pairs each bound path with its socket's inode, which the process's
    ``/proc/PID/fd`` links name as ``socket:[INODE]``.
    """
    wanted = set()
    with contextlib.suppress(OSError), open("/proc/net/unix") as table:
        next(table, None)
        for line in table:
            fields = line.split()  # Num RefCount Protocol Flags Type St Inode Path
            if len(fields) >= 8 and fields[7] == str(path) and fields[5] == "01":
                wanted.add(f"socket:[{fields[6]}]")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in wanted:
                    comm = (entry / "comm").read_text().strip()
                    return f"process {entry.name} ({comm})"
    return "another process"


# -- HTTP ------------------------------------------------------------------------------------

#: An endpoint: the request's JSON object in, the reply's out.
Endpoint = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class PluginServer:
    """Answers Docker's plugin requests on a listening socket by calling *driver*."""

    def __init__(self, driver: DockerDriver) -> None:
        self.driver = driver
        self.endpoints: dict[str, Endpoint] = {
            "/Plugin.Activate": self._activate,
            "/VolumeDriver.Capabilities": self._capabilities,
            "/VolumeDriver.Create": self._create,
            "/VolumeDriver.Remove": self._remove,
            "/VolumeDriver.Mount": self._mount,
            "/VolumeDriver.Unmount": self._unmount,
            "/VolumeDriver.Path": self._path,
            "/VolumeDriver.Get": self._get,
            "/VolumeDriver.List": self._list,
        }

    async def serve(self, listener: trio.socket.SocketType) -> None:
        """Accept connections until cancelled; each is served in a task of its own."""
        await serve_connections(listener, self._serve_connection, "Docker plugin")

    async def _serve_connection(self, conn: trio.socket.SocketType) -> None:
        """Answer the requests of one connection (kept alive, as Docker's client does)."""
        stream = trio.SocketStream(conn)
        http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADERS)
        try:
            allowed = control.peer_uid(conn) in (0, os.geteuid())
            while True:
                with trio.fail_after(IDLE_TIMEOUT):
                    event = await next_event(stream, http)
                if not isinstance(event, h11.Request):
                    return  # the client closed the connection
                try:
                    with trio.fail_after(REQUEST_TIMEOUT):
                        body = await read_body(stream, http, MAX_BODY)
                    if not allowed:
                        raise HttpError(403, "permission denied: only root may use this plugin")
                    status, reply = await self._answer(event, body)
                except HttpError as exc:
                    status, reply = exc.status, {"Err": str(exc)}
                await _send(stream, http, status, reply)
                if http.our_state is not h11.DONE or http.their_state is not h11.DONE:
                    return  # a body left unread, or the client asked to close
                http.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            if http.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                with contextlib.suppress(OSError, trio.BrokenResourceError, h11.LocalProtocolError):
                    reply = {"Err": f"malformed HTTP request: {str(exc)[:200]}"}
                    await _send(stream, http, exc.error_status_hint, reply)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass  # the client went away, or was too slow
        except Exception:
            log.exception("Docker plugin: connection failed")
        finally:
            # Drain what a client sent beyond what was read (a refused body, say), so that the
            # close sends no RST that could destroy the reply before the client reads it.
            with (
                contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError),
                trio.move_on_after(1),
            ):
                await stream.send_eof()
                while await stream.receive_some(65536):
                    pass
            await stream.aclose()

    async def _answer(self, request: h11.Request, body: bytes) -> tuple[int, dict[str, Any]]:
        target = request.target.decode("latin-1")
        endpoint = self.endpoints.get(target)
        if endpoint is None:
            raise HttpError(404, f"unknown endpoint {target[:80]!r}: this is volfs's Docker "
                                 "volume plugin (Plugin.Activate, VolumeDriver.*)")  # fmt: skip
        if request.method != b"POST":
            raise HttpError(405, f"{target[:80]} takes POST, not {request.method.decode()[:20]}")
        args = _json_object(body)
        try:
            return 200, await endpoint(args)
        except HttpError:
            raise
        except VolfsError as exc:
            log.info("Docker plugin: %s refused: %s", target, exc)
            return STATUS.get(exc.code, 500), {"Err": str(exc)}
        except Exception:
            log.exception("Docker plugin: %s failed", target)
            return 500, {"Err": "internal error in volfsd; see its log"}

    # -- the endpoints --------------------------------------------------------------------

    async def _activate(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"Implements": ["VolumeDriver"]}

    async def _capabilities(self, args: dict[str, Any]) -> dict[str, Any]:
        # local: a volume of this host's store; Docker (Swarm) must not expect it elsewhere.
        # global: a cluster engine's, the same volume on every host that names the engine.
        return {"Capabilities": {"Scope": self.driver.scope}}

    async def _create(self, args: dict[str, Any]) -> dict[str, Any]:
        options = args.get("Opts") or {}
        if not isinstance(options, dict):
            raise HttpError(400, "Opts must be a JSON object")
        await self.driver.create(_text(args, "Name"), options)
        return {"Err": ""}

    async def _remove(self, args: dict[str, Any]) -> dict[str, Any]:
        await self.driver.remove(_text(args, "Name"))
        return {"Err": ""}

    async def _mount(self, args: dict[str, Any]) -> dict[str, Any]:
        path = await self.driver.mount(_text(args, "Name"), _text(args, "ID"))
        return {"Mountpoint": str(path), "Err": ""}

    async def _unmount(self, args: dict[str, Any]) -> dict[str, Any]:
        await self.driver.unmount(_text(args, "Name"), _text(args, "ID"))
        return {"Err": ""}

    async def _path(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"Mountpoint": self.driver.path(_text(args, "Name")), "Err": ""}

    async def _get(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"Volume": await self.driver.get(_text(args, "Name")), "Err": ""}

    async def _list(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"Volumes": await self.driver.list(), "Err": ""}


def _text(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise HttpError(400, f"{key} must be a non-empty string")
    return value


def _json_object(body: bytes) -> dict[str, Any]:
    """The JSON object of a request body; an empty body (Plugin.Activate's) or null is {}."""
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        raise HttpError(400, "the request body is not JSON") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise HttpError(400, "the request body must be a JSON object")
    return value


async def _send(
    stream: trio.SocketStream, http: h11.Connection, status: int, reply: dict[str, Any]
) -> None:
    await send_response(stream, http, status, CONTENT_TYPE, json.dumps(reply).encode())
