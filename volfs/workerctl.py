"""A mount worker's control socket, and the daemon's handle on a worker process.

Workers outlive the daemon that started them (a daemon restart or crash must not take the
volumes down, as containers outlive dockerd with live-restore).  So a worker is not tied to its
starter: it runs in a session of its own, and it listens on
``$VOLFS_RUN_DIR/workers/NAME.sock`` (same frames as control.py).  A daemon that starts finds
the running workers there and adopts them; it watches every worker, its own children and
adopted ones alike, through a pidfd.

Requests a worker answers: ``status`` (protocol, version, store root, pid, mount point,
device, read_only) and ``set_limits`` (size, inodes: new limits, at once and in the header).
``PROTOCOL`` changes when a request or a field changes meaning; a daemon meeting a worker of
another protocol leaves it serving and reports that the volume needs a remount.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from volfs import control
from volfs.errors import VolfsError

PROTOCOL = 1
WORKERS_DIR = "workers"
CALL_TIMEOUT = 5.0

Handler = Callable[..., Awaitable[dict]]


def socket_path(run_dir: Path, name: str) -> Path:
    return run_dir / WORKERS_DIR / f"{name}.sock"


async def receive_frame(stream: trio.abc.ReceiveStream) -> dict:
    """One length-prefixed msgpack map from *stream* (control.py's framing)."""
    length = control.frame_length(await _receive_exactly(stream, 4))
    return control.decode_body(await _receive_exactly(stream, length))


async def _receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            raise control.ProtocolError("connection closed mid-frame")
        data += chunk
    return data


# -- the worker's side ----------------------------------------------------------------------


def listen(path: Path) -> socket.socket:
    """A listening socket at *path*, mode 0600, in a 0700 directory; a stale one is replaced
    (the caller holds the volume's lock, so no live worker listens there).  Made before the
    worker reports ready, so that a daemon started at any moment after finds it."""
    path.parent.mkdir(mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    listener.listen(16)
    return listener


async def serve(sock: socket.socket, handlers: dict[str, Handler]) -> None:
    """Answer requests on *sock* one at a time, from root or our own uid only."""
    listener = trio.socket.from_stdlib_socket(sock)
    while True:
        conn, _ = await listener.accept()
        stream = trio.SocketStream(conn)
        try:
            with trio.move_on_after(CALL_TIMEOUT):
                reply = await _answer(conn, stream, handlers)
                await stream.send_all(control.encode(reply))
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the daemon went away mid-request
        finally:
            await stream.aclose()


async def _answer(
    conn: trio.socket.SocketType, stream: trio.SocketStream, handlers: dict[str, Handler]
) -> dict:
    if control.peer_uid(conn) not in (0, os.geteuid()):  # type: ignore[arg-type]
        return {"ok": False, "error": "permission denied"}
    try:
        request = await receive_frame(stream)
    except control.ProtocolError as exc:
        return {"ok": False, "error": f"malformed request: {exc}"}
    handler = handlers.get(request.get("cmd"))  # type: ignore[arg-type]
    args = request.get("args", {})
    if handler is None or not isinstance(args, dict):
        return {"ok": False, "error": "unknown command"}
    try:
        return {"ok": True, "result": await handler(**args)}
    except (TypeError, VolfsError) as exc:  # bad arguments, or a request the volume refuses
        return {"ok": False, "error": str(exc)}


# -- the daemon's side ----------------------------------------------------------------------


class WorkerUnreachable(Exception):
    """No worker answers on that socket (none listens, or it does not speak our protocol)."""


class WorkerRefused(VolfsError):
    """The worker answered, and refused the request; ``str()`` is its one line for the user."""


async def call(path: Path, cmd: str, timeout: float = CALL_TIMEOUT, **args: object) -> dict:
    try:
        with trio.fail_after(timeout):
            sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
            stream = trio.SocketStream(sock)
            try:
                await sock.connect(str(path))
                await stream.send_all(control.encode({"cmd": cmd, "args": args}))
                reply = await receive_frame(stream)
            finally:
                await stream.aclose()
    except (OSError, trio.TooSlowError, trio.BrokenResourceError, control.ProtocolError) as exc:
        raise WorkerUnreachable(f"{path}: {exc!r}") from None
    if not reply.get("ok"):
        raise WorkerRefused(str(reply.get("error", "the worker refused")))
    if not isinstance(reply.get("result"), dict):
        raise WorkerUnreachable(f"{path}: bad reply")
    return reply["result"]


class WorkerProcess:
    """A worker process, started by this daemon or adopted from an earlier one.

    Watched through a pidfd, which works for processes that are not our children; our own
    children are reaped as well (their exit status is known only for them).
    """

    def __init__(self, pid: int, child: bool) -> None:
        self.pid = pid
        self.child = child
        self._pidfd = os.pidfd_open(pid)  # ProcessLookupError if it is gone already
        self._exited = trio.Event()
        self._watching = False
        #: The exit status (as subprocess gives it) of a child that ended; None otherwise.
        self.returncode: int | None = None

    @classmethod
    def spawn(cls, args: list[str], log_fd: int, keep_fd: int) -> WorkerProcess:
        """Start *args* in a session of its own (so that it outlives us and our process
        group's signals), stdout and stderr to *log_fd*, with *keep_fd* inherited."""
        os.set_inheritable(keep_fd, True)
        pid = os.posix_spawn(
            args[0],
            args,
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, log_fd, 1),
                (os.POSIX_SPAWN_DUP2, log_fd, 2),
            ],
            setsid=True,
            setsigdef=(signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE),
        )
        return cls(pid, child=True)

    @property
    def running(self) -> bool:
        return not self._exited.is_set()

    async def wait(self) -> None:
        """Return once the process has ended (any number of tasks may wait)."""
        while not self._exited.is_set():
            if self._watching:
                with trio.move_on_after(1):
                    await self._exited.wait()
                continue
            self._watching = True
            try:
                await trio.lowlevel.wait_readable(self._pidfd)
            finally:
                self._watching = False
            if self.child:
                with contextlib.suppress(ChildProcessError):
                    _, status = os.waitpid(self.pid, 0)
                    self.returncode = os.waitstatus_to_exitcode(status)
            self._exited.set()
            os.close(self._pidfd)

    def send_signal(self, signum: int) -> None:
        if self._exited.is_set():
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, signum)
