"""The daemon's control server: its unix socket, the peers it answers, and dispatch.

One front end of the supervisor (supervisor.py): it accepts connections on
``RUN_DIR/volfsd.sock`` (mode 0600), answers only root and the daemon's own uid (checked by
``SO_PEERCRED``, not by the socket's mode alone), reads one frame (control.py), decodes it
into a typed request (requests.py) and calls the supervisor's method for it.  Every failure
is a reply with a one-line error and its code; nothing a client sends or does may take the
daemon down.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from volfs import control, requests
from volfs.errors import ErrorCode, VolfsError
from volfs.history_commands import HistoryCommands
from volfs.supervisor import Supervisor
from volfs.volume_stats import gather

log = logging.getLogger(__name__)

REQUEST_READ_TIMEOUT = 10.0
#: What a request that hit a bug is answered; the CLI names the daemon's log (found by pid).
INTERNAL_ERROR = "internal error in volfsd; see its log"


async def listen(path: Path) -> trio.socket.SocketType:
    """The daemon's listening socket at *path*, born 0600 (only its owner can connect).

    A socket left there is stale: the caller holds the run dir's lock, so nobody else
    listens on it.
    """
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    old_umask = os.umask(0o177)
    try:
        await listener.bind(str(path))
    finally:
        os.umask(old_umask)
    listener.listen(64)
    return listener


async def serve_connections(
    listener: trio.socket.SocketType,
    handle: Callable[[trio.socket.SocketType], Awaitable[None]],
    what: str,
) -> None:
    """Accept connections on *listener* until cancelled, each handled by *handle* in a task
    of its own: the accept loop of every front end of the daemon (*what* names it in logs)."""
    async with trio.open_nursery() as nursery:
        while True:
            try:
                conn, _ = await listener.accept()
            except OSError as exc:  # out of file descriptors, say: wait, do not die
                log.error("%s: cannot accept a connection: %s", what, exc)
                await trio.sleep(0.5)
                continue
            nursery.start_soon(handle, conn)


class ControlServer:
    """Answers requests on a listening socket by calling *supervisor*."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.history = HistoryCommands(supervisor)

    async def serve(self, listener: trio.socket.SocketType) -> None:
        """Accept connections until cancelled; each is answered in a task of its own."""
        await serve_connections(listener, self._serve_connection, "control socket")

    async def _serve_connection(self, conn: trio.socket.SocketType) -> None:
        """Answer one request; nothing a client sends or does may take the daemon down."""
        stream = trio.SocketStream(conn)
        try:
            if control.peer_uid(conn) not in (0, os.geteuid()):
                refusal = "permission denied: not the daemon's owner"
                reply = control.error_reply(VolfsError(refusal, ErrorCode.PERMISSION))
            else:
                reply = await self._answer(stream)
            await stream.send_all(control.encode(reply))
            await stream.send_eof()
            with trio.move_on_after(1):  # drain what a bad client sent, so close() sends no RST
                while await stream.receive_some(65536):
                    pass
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except Exception:
            log.exception("connection failed")
        finally:
            await stream.aclose()

    async def _answer(self, stream: trio.SocketStream) -> dict[str, Any]:
        try:
            with trio.fail_after(REQUEST_READ_TIMEOUT):
                frame = await control.receive_frame(stream)
            cmd, args = frame.get("cmd"), frame.get("args", {})
            request = requests.decode(requests.DAEMON_COMMANDS, cmd, args)
            return control.ok_reply(await self.dispatch(request))
        except trio.TooSlowError:
            return control.error_reply(requests.malformed("incomplete frame"))
        except control.ProtocolError as exc:
            return control.error_reply(requests.malformed(str(exc)))
        except VolfsError as exc:
            return control.error_reply(exc)
        except Exception:
            log.exception("request failed")
            return control.error_reply(VolfsError(INTERNAL_ERROR, ErrorCode.INTERNAL))

    async def dispatch(self, request: requests.DaemonRequest) -> object:
        """The supervisor's result for *request*."""
        supervisor = self.supervisor
        match request:
            case requests.CreateRequest():
                return await supervisor.namespace.create(request)
            case requests.LsRequest(snapshots=True):
                return await self.history.snapshots()
            case requests.LsRequest():
                return await supervisor.namespace.ls(request)
            case requests.InspectRequest():
                return await supervisor.namespace.inspect(request)
            case requests.StatusRequest():
                return await supervisor.status(request)
            case requests.MountRequest():
                return await supervisor.mount(request)
            case requests.UmountRequest():
                return await supervisor.umount(request)
            case requests.UmountAllRequest():
                return await supervisor.umount_all(request)
            case requests.RmRequest():
                return await supervisor.rm(request)
            case requests.ResizeRequest():
                return await supervisor.resize(request)
            case requests.SnapshotRequest():
                return await self.history.snapshot(request)
            case requests.CloneRequest():
                return await self.history.clone(request)
            case requests.RollbackRequest():
                return await self.history.rollback(request)
            case requests.StatsRequest(names=names):
                return await gather(supervisor, names or None)
