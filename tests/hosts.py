"""A private volfs "host" for tests: a store root, a runtime dir and the CLI pointed at them."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import msgpack

from volfs import mounts

from conftest import _wait_gone, stop_daemon


class Host:
    """A store root and runtime dir of our own, and the CLI pointed at them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = tmp / "store"
        self.run = tmp / "run"
        self.env = {**os.environ, "VOLFS_ROOT": str(self.root), "VOLFS_RUN_DIR": str(self.run)}

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "volfs", *args], env=self.env,
                              capture_output=True, text=True, timeout=180)  # fmt: skip
        if check:
            assert done.returncode == 0, f"volfsd {' '.join(args)}: {done.stderr}"
        return done

    def refused(self, *args: str, words: tuple[str, ...] = ()) -> str:
        done = self.cli(*args, check=False)
        assert done.returncode == 1, done
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("volfsd: "), done.stderr
        for word in words:
            assert word in done.stderr, done.stderr
        return done.stderr

    def status(self) -> dict:
        """`volfsd status --format json`, with the volumes keyed by name."""
        status = json.loads(self.cli("status", "--format", "json").stdout)
        status["by_name"] = {v["name"]: v for v in status["volumes"]}
        return status

    def daemon_pid(self) -> int:
        return int((self.run / "volfsd.pid").read_text().split()[0])

    def worker_pid(self, name: str) -> int:
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
            _wait_gone(daemon, 10)
