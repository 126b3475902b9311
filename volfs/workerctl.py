"""The daemon <-> worker seam: a worker's control socket, and the daemon's handle on a worker.

Workers outlive the daemon that started them (a daemon restart or crash must not take the
volumes down, as containers outlive dockerd with live-restore).  So a worker is not tied to its
starter: it runs in a session of its own, and it listens on
``$VOLFS_RUN_DIR/workers/NAME.sock``, with the frames and replies of control.py (an error reply
carries a code).  Any daemon of that runtime dir may connect, at any time and as often as it
likes (one request per connection): a daemon that starts finds the running workers there and
adopts them, and watches every worker, its own children and adopted ones alike, through a
pidfd, so nothing depends on being the worker's parent.

The requests are dataclasses of requests.py, decoded at the edge like the daemon's:
``status`` (:class:`WorkerStatusRequest`: protocol, version, store root, pid, mount point,
device, read_only) and ``set_limits`` (:class:`SetLimitsRequest`: size, inodes: new limits,
at once and in the header).  ``PROTOCOL`` changes when a request or a field changes meaning;
a daemon meeting a worker of another protocol leaves it serving and reports that the volume
needs a remount.  New requests and new reply fields do not change it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from volfs import control, requests
from volfs.errors import ErrorCode, VolfsError

PROTOCOL = 1
WORKERS_DIR = "workers"
CALL_TIMEOUT = 5.0

#: The worker's answer to one decoded request: the reply's result.
Answer = Callable[[requests.WorkerRequest], Awaitable[dict[str, Any]]]


def socket_path(run_dir: Path, name: str) -> Path:
    return run_dir / WORKERS_DIR / f"{name}.sock"


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


async def serve(sock: socket.socket, answer: Answer) -> None:
    """Answer requests on *sock* one at a time, from root or our own uid only."""
    listener = trio.socket.from_stdlib_socket(sock)
    while True:
        conn, _ = await listener.accept()
        stream = trio.SocketStream(conn)
        try:
            # The answer itself is not timed: a snapshot of a large volume takes seconds, and
            # a step that does not await cannot be cut short anyway.
            reply = await _reply(conn, stream, answer)
            with trio.move_on_after(CALL_TIMEOUT):
                await stream.send_all(control.encode(reply))
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the daemon went away mid-request, or never sent one whole
        finally:
            await stream.aclose()


async def _reply(
    conn: trio.socket.SocketType, stream: trio.SocketStream, answer: Answer
) -> dict[str, Any]:
    if control.peer_uid(conn) not in (0, os.geteuid()):
        return control.error_reply(VolfsError("permission denied", ErrorCode.PERMISSION))
    try:
        with trio.fail_after(CALL_TIMEOUT):
            frame = await control.receive_frame(stream)
        request = requests.decode(requests.WORKER_COMMANDS, frame.get("cmd"), frame.get("args", {}))
        return control.ok_reply(await answer(request))
    except control.ProtocolError as exc:
        return control.error_reply(requests.malformed(str(exc)))
    except VolfsError as exc:  # a bad request, or one the volume refuses
        return control.error_reply(exc)


# -- the daemon's side ----------------------------------------------------------------------


class WorkerUnreachable(Exception):
    """No worker answers on that socket (none listens, or it does not speak our protocol)."""


class WorkerRefused(VolfsError):
    """The worker answered, and refused the request; ``str()`` is its one line for the user,
    ``code`` the reply's."""


async def call(
    path: Path, request: requests.WorkerRequest, timeout: float = CALL_TIMEOUT
) -> dict[str, Any]:
    """Send *request* to the worker listening on *path*; its result.

    Raises WorkerUnreachable if nothing answers there in *timeout* s, WorkerRefused (with
    the reply's code) if the worker refused.
    """
    try:
        with trio.fail_after(timeout):
            sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
            stream = trio.SocketStream(sock)
            try:
                await sock.connect(str(path))
                await stream.send_all(control.encode(requests.encode(request)))
                reply = await control.receive_frame(stream)
            finally:
                await stream.aclose()
    except (OSError, trio.TooSlowError, trio.BrokenResourceError, control.ProtocolError) as exc:
        raise WorkerUnreachable(f"{path}: {exc!r}") from None
    if not reply.get("ok"):
        error = control.reply_error(reply, "the worker refused")
        raise WorkerRefused(str(error), error.code)
    result = reply.get("result")
    if not isinstance(result, dict):
        raise WorkerUnreachable(f"{path}: bad reply")
    return result


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
    def spawn(cls, args: list[str], log_fd: int, *keep_fds: int) -> WorkerProcess:
        """Start *args* in a session of its own (so that it outlives us and our process
        group's signals), stdout and stderr to *log_fd*, with *keep_fds* inherited."""
        for fd in keep_fds:
            os.set_inheritable(fd, True)
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
