"""A private volfs "host" for tests: a store root, a runtime dir and the CLI pointed at them."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
from pathlib import Path

import msgpack

from volfs import mounts

from helpers import assert_one_line_error, cli_env, stop_daemon, volfsd, wait_gone


class Host:
    """A store root and runtime dir of our own, and the CLI pointed at them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = tmp / "store"
        self.run = tmp / "run"
        self.env = cli_env(self.root, self.run)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return volfsd(*args, root=self.root, run_dir=self.run, check=check, timeout=180)

    def refused(self, *args: str, words: tuple[str, ...] = ()) -> str:
        return assert_one_line_error(self.cli(*args, check=False), *words)

    def status(self) -> dict:
        """`volfsd status --format json`, with the volumes keyed by name."""
        status = json.loads(self.cli("status", "--format", "json").stdout)
        status["by_name"] = {v["name"]: v for v in status["volumes"]}
        return status

    def daemon_pid(self) -> int:
        """The daemon's pid (OSError, ValueError or IndexError while there is none)."""
        return int((self.run / "volfsd.pid").read_text().split()[0])

    def worker_pid(self, name: str) -> int:
        """The pid of *name*'s worker (OSError, ValueError or IndexError while none holds it)."""
        return int((self.root / "volumes" / name / "lock").read_text().split()[0])

    def request(self, raw: bytes, timeout: float = 10) -> dict | None:
        """Send raw bytes to the control socket; return the decoded reply, if any."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.run / "volfsd.sock"))
            sock.sendall(raw)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        if len(data) < 4:
            return None
        return msgpack.unpackb(data[4:], raw=False)

    def cleanup(self) -> None:
        daemon = stop_daemon(self.run)
        for entry in mounts.volfs_mounts():
            if entry.mountpoint.startswith(str(self.tmp)):
                mounts.detach(entry.mountpoint, lazy=True)
        if daemon:
            wait_gone(daemon, 10)
