"""The control protocol between `volfsd` commands and the daemon.

A unix stream socket carries frames of ``u32 big-endian length | msgpack map``.  A request is
``{"cmd": str, "args": map}`` (requests.py has one dataclass per command); the reply is
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "one line for the user", "code":
"busy"}``, the code an :class:`ErrorCode` value.  One request per connection.  The same frames
and replies serve a worker's control socket (workerctl.py).

This module is the client side and the frames; the daemon's side is control_server.py.  It
loads no trio, so that the CLI starts quickly.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from volfs import requests
from volfs.errors import ErrorCode, VolfsError

if TYPE_CHECKING:
    import trio

MAX_FRAME = 1 << 20
SOCKET_NAME = "volfsd.sock"
#: The daemon's pid lock in its runtime dir: held while a daemon serves it.
PID_FILE = "volfsd.pid"
_LENGTH = struct.Struct(">I")


class ProtocolError(Exception):
    """A frame that is not a well-formed request or reply."""


class DaemonNotRunning(VolfsError):
    """No daemon listens on the control socket."""

    default_code = ErrorCode.UNAVAILABLE


#: Root's runtime directory: the system's daemon's (volfsd.service's).
SYSTEM_RUN_DIR = Path("/run/volfs")


def default_run_dir() -> Path:
    """``$VOLFS_RUN_DIR``, else /run/volfs for root, else ``$XDG_RUNTIME_DIR/volfs``."""
    if env := os.environ.get("VOLFS_RUN_DIR"):
        return Path(env)
    if os.geteuid() == 0:
        return SYSTEM_RUN_DIR
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/volfs-{os.getuid()}"
    return Path(runtime) / "volfs"


def log_destination(pid: int | str = "self") -> str:
    """Where process *pid* (default: this one) writes its log, i.e. its stderr, for messages.

    volfsd logs to stderr: a file when `volfsd mount` started it (logs/volfsd.log), the journal
    under systemd (which sets ``JOURNAL_STREAM`` to the device and inode of that socket).
    """
    fd2 = f"/proc/{pid}/fd/2"
    try:
        target = os.readlink(fd2)
        st = os.stat(fd2)  # follows the magic link to what fd 2 is
    except OSError:
        return f"the log of process {pid} (its stderr)"
    if stat.S_ISREG(st.st_mode):
        return target.removesuffix(" (deleted)")
    journal = os.environ.get("JOURNAL_STREAM") if pid == "self" else _environ(pid, "JOURNAL_STREAM")
    if journal == f"{st.st_dev}:{st.st_ino}":
        return "the journal (journalctl -u volfsd)"
    return f"the stderr of process {pid} ({target})"


def _environ(pid: int | str, name: str) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as env:
            entries = env.read().split(b"\0")
    except OSError:
        return None
    prefix = name.encode() + b"="
    return next(
        (e[len(prefix) :].decode(errors="replace") for e in entries if e.startswith(prefix)), None
    )


def daemon_log(run_dir: Path) -> str:
    """Where the daemon of *run_dir* logs (named in errors that point to its log)."""
    try:
        pid = int((run_dir / PID_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return "the daemon's log (its stderr)"
    return log_destination(pid)


def peer_uid(sock: socket.socket | trio.socket.SocketType) -> int:
    """The uid of the process at the other end of a unix socket (``SO_PEERCRED``)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    return int.from_bytes(creds[4:8], "little")


def encode(message: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(message, use_bin_type=True)
    return _LENGTH.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many unrelated types on garbage
        raise ProtocolError(f"undecodable frame: {type(exc).__name__}") from None
    if not isinstance(message, dict):
        raise ProtocolError("a frame must hold a map")
    return message


def frame_length(prefix: bytes) -> int:
    length: int = _LENGTH.unpack(prefix)[0]
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes is larger than {MAX_FRAME}")
    return length


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ProtocolError("connection closed mid-frame")
        data += chunk
    return data


async def receive_frame(stream: trio.abc.ReceiveStream) -> dict[str, Any]:
    """One frame from *stream*, in a trio task (the daemon's and a worker's side)."""
    length = frame_length(await _receive_exactly(stream, 4))
    return decode_body(await _receive_exactly(stream, length))


async def _receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            raise ProtocolError("connection closed mid-frame")
        data += chunk
    return data


def ok_reply(result: object) -> dict[str, Any]:
    return {"ok": True, "result": result}


def error_reply(error: VolfsError) -> dict[str, Any]:
    """The reply that reports *error*: its one line, and its code for programs to decide on."""
    return {"ok": False, "error": str(error), "code": error.code.value}


def reply_error(reply: dict[str, Any], unknown: str) -> VolfsError:
    """The error an error *reply* reports, with its code (*unknown*: the text if it has none).

    A reply without a code, or with one this volfs does not know (an older or newer peer),
    gets ``ErrorCode.INTERNAL``: nothing may be decided on it.
    """
    try:
        code = ErrorCode(str(reply.get("code")))
    except ValueError:
        code = ErrorCode.INTERNAL
    return VolfsError(str(reply.get("error", unknown)), code)


def call(run_dir: Path, request: requests.DaemonRequest, timeout: float = 300.0) -> Any:
    """Send *request* to the daemon and return its result; raise VolfsError (with the reply's
    code) on an error reply."""
    path = run_dir / SOCKET_NAME
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonNotRunning(f"no volfsd daemon is listening on {path}") from None
        except PermissionError:
            raise VolfsError(
                f"permission denied on {path}: the daemon belongs to another user",
                ErrorCode.PERMISSION,
            ) from None
        sock.sendall(encode(requests.encode(request)))
        reply = decode_body(_recv_exactly(sock, frame_length(_recv_exactly(sock, 4))))
    except TimeoutError:
        raise VolfsError(
            f"the daemon did not answer {request.command!r} within {timeout:.0f} s",
            ErrorCode.UNAVAILABLE,
        ) from None
    except ProtocolError as exc:
        raise VolfsError(f"bad reply from the daemon: {exc}", ErrorCode.UNAVAILABLE) from None
    finally:
        sock.close()
    if not reply.get("ok"):
        raise reply_error(reply, "the daemon reported an unknown error")
    return reply.get("result")
