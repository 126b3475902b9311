"""Where the daemon and the mount workers log: the journal, or lines on stderr (text or JSON).

Under systemd a service's stderr is a stream to the journal, and systemd says so in
``JOURNAL_STREAM`` (``DEVICE:INODE`` of that stream).  A process whose stderr is that stream
logs through the journal's native protocol instead: one datagram per record on journald's
socket, with a priority and fields a reader can filter on (``journalctl VOLUME=NAME``).  The
daemon's workers log to their files on stderr, which are no journal; the daemon tells them to
use the journal too (`worker_args`).

The protocol is written here, not taken from a library: Debian's python3-systemd is a C binding
to libsystemd for the system interpreter (the project's venv would need system site packages,
or a build against libsystemd-dev), and libsystemd sends to its own socket path, which a test
cannot point elsewhere; the PyPI clients (cysystemd, journald-send) are single-maintainer
packages for what is a few lines of key=value framing (https://systemd.io/JOURNAL_NATIVE_PROTOCOL/).

Records may carry ``volume`` and ``inode`` (``log.info(..., extra={"inode": ino})``); a
worker's records name its volume without that (`configure`'s *volume*).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import struct
import sys
from typing import Any

from volfs.errors import VolfsError

#: The ``--log-format`` values: text lines (the default), or one JSON object per line.
FORMATS = ("text", "json")
#: The daemon's text lines (`volfsd serve`), as before the journal and JSON.
DAEMON_LAYOUT = "%(asctime)s volfsd[%(process)d] %(levelname)s %(message)s"
#: A mount worker's text lines (its logs/NAME.log, or the terminal of `volfsd mount -f`).
WORKER_LAYOUT = "%(asctime)s volfsd[%(process)d] %(levelname)s %(name)s: %(message)s"
#: Overrides journald's native socket (tests bind one of their own).
JOURNAL_SOCKET_ENV = "VOLFS_JOURNAL_SOCKET"
DEFAULT_JOURNAL_SOCKET = "/run/systemd/journal/socket"
#: The journal's SYSLOG_IDENTIFIER of every record (what ``journalctl -t`` selects).
IDENTIFIER = "volfsd"

#: syslog priorities of the logging levels (a level between two takes the lower one's).
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_DEBUG_PRIORITY = 7
#: How this process logs, for the workers it starts: (format, to the journal).
_current: tuple[str, bool] = ("text", False)


def parse_log_format(value: object) -> str:
    """A ``--log-format`` / config ``log_format`` value."""
    if value not in FORMATS:
        raise VolfsError(f"invalid log format {str(value)[:40]!r}: use text or json")
    return str(value)


def stderr_is_journal() -> bool:
    """Whether systemd connected our stderr to the journal (``JOURNAL_STREAM`` names it)."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):  # unset, malformed, or no stderr
        return False


def configure(log_format: str, layout: str, *, journal: bool, volume: str | None = None) -> None:
    """Send this process's records (INFO and up) to the journal if *journal*, else to stderr
    in *log_format* (text lines in *layout*, or JSON); *volume* names every record's volume
    where the record names none.  Replaces what was set up before (`volfsd mount -f` runs the
    worker in the CLI's process)."""
    global _current
    handler: logging.Handler
    if journal:
        handler = JournalHandler(logging.Formatter(layout))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(layout))
    if volume is not None:
        handler.addFilter(_DefaultVolume(volume))
    logging.basicConfig(force=True, level=logging.INFO, handlers=[handler])
    _current = (log_format, journal)


def worker_args() -> list[str]:
    """The worker arguments that make a worker log as this process does."""
    log_format, journal = _current
    return ["--log-format", log_format, *(["--journal"] if journal else [])]


class _DefaultVolume(logging.Filter):
    """Gives each record that names no volume this process's one."""

    def __init__(self, volume: str) -> None:
        super().__init__()
        self.volume = volume

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "volume", None) is None:
            record.volume = self.volume
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, pid, and
    volume, inode and the traceback where the record has them."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry: dict[str, Any] = {
            "time": stamp.isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key in ("volume", "inode"):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def priority(level: int) -> int:
    """The syslog priority of logging level *level*."""
    for floor, value in _PRIORITIES:
        if level >= floor:
            return value
    return _DEBUG_PRIORITY


def encode_entry(fields: dict[str, str]) -> bytes:
    """*fields* in the native protocol: ``KEY=value`` lines, and a value with a newline as
    ``KEY``, newline, its length (64-bit little-endian), the value and a newline."""
    out = bytearray()
    for key, text in fields.items():
        value = text.encode(errors="replace")
        if b"\n" in value:
            out += key.encode() + b"\n" + struct.pack("<Q", len(value)) + value + b"\n"
        else:
            out += key.encode() + b"=" + value + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    """Sends each record to journald as one native-protocol entry.

    Never blocks the trio loop of a worker on a slow journald: the socket is non-blocking, and
    an entry journald does not take (its queue full, or it is not running) is written to
    stderr instead, as a text line.
    """

    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.path = os.environ.get(JOURNAL_SOCKET_ENV, DEFAULT_JOURNAL_SOCKET)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setblocking(False)
        self.fallback = logging.StreamHandler()
        self.fallback.setFormatter(formatter)

    def fields(self, record: logging.LogRecord) -> dict[str, str]:
        """The journal fields of *record*."""
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
        fields = {
            "MESSAGE": message,
            "PRIORITY": str(priority(record.levelno)),
            "SYSLOG_IDENTIFIER": IDENTIFIER,
            "LOGGER": record.name,
            "CODE_FILE": record.pathname,
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": record.funcName,
        }
        for key in ("volume", "inode"):
            value = getattr(record, key, None)
            if value is not None:
                fields[key.upper()] = str(value)
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = encode_entry(self.fields(record))
        except Exception:  # logging's own rule: a bad record must not raise
            self.handleError(record)
            return
        try:
            self._send(data)
        except OSError:
            self.fallback.emit(record)

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendto(data, self.path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(data)

    def _send_memfd(self, data: bytes) -> None:
        """Send an entry too large for a datagram as a sealed memfd (the protocol's way)."""
        fd = os.memfd_create("volfs-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
            self.sock.sendmsg([], rights, 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        super().close()
