"""A private volfs "host" for tests: a store root, a runtime dir and the CLI pointed at them."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
from pathlib import Path

import msgpack

from volfs import logs, mounts
from volfs.store.root import StoreRoot

import audit
from helpers import (
    VOLFSD,
    alive,
    assert_one_line_error,
    cli_env,
    pid_in,
    stop_daemon,
    volfsd,
    wait_gone,
    wait_until,
)

#: `volfsd mount` options that take a value.
_VALUED = ("--size", "--inodes")


class Host:
    """A store root and runtime dir of our own, and the CLI pointed at them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = tmp / "store"
        self.run = tmp / "run"
        self.env = cli_env(self.root, self.run)
        #: The descriptors of each worker a `mount` through `cli` found serving, by its pid.
        self._fds: dict[int, audit.FdWatch] = {}
        self._daemons: list[subprocess.Popen[bytes]] = []  # started by `serve`

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = volfsd(*args, root=self.root, run_dir=self.run, check=check, timeout=180)
        if args and args[0] == "mount" and done.returncode == 0:
            self._watch(args[1:])
        return done

    def _watch(self, mount_args: tuple[str, ...]) -> None:
        """Note the descriptors of the worker that serves the volume *mount_args* name, if it
        is new (the first mount of a volume, not a further path)."""
        name, words = None, list(mount_args)
        while words and name is None:
            word = words.pop(0)
            if word in _VALUED:
                words = words[1:]
            elif not word.startswith("-"):
                name = word
        pid = pid_in(self.root / "volumes" / name / "lock") if name else None
        if pid is not None and pid not in self._fds:
            self._fds[pid] = audit.FdWatch(pid)

    def check_fds(self) -> None:
        """Fail if a worker that still serves holds more descriptors than after its mount."""
        for pid, watch in self._fds.items():
            if alive(pid):
                watch.check()

    def serve(self, *args: str, journal: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``volfsd serve ARGS`` in the background, logging where the daemon that
        `volfsd mount` starts logs (so the checks after the test read it too); return once it
        answers.  `cleanup` stops it.

        With *journal* (a datagram socket the test bound), the daemon is told as systemd
        would that its stderr is the journal, and that *journal* is journald's socket.
        """
        env = self.env
        with StoreRoot(self.root).open_log("volfsd.log") as log:
            if journal is not None:
                st = os.fstat(log.fileno())
                env = {**env, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}",
                       logs.JOURNAL_SOCKET_ENV: str(journal)}  # fmt: skip
            proc = subprocess.Popen(
                [*VOLFSD, "serve", *args], env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
        self._daemons.append(proc)

        def answers() -> bool:
            return proc.poll() is not None or self.cli("status", check=False).returncode == 0

        wait_until(answers, "volfsd serve to answer", timeout=30)
        if proc.poll() is not None:
            log_text = (self.root / "logs" / "volfsd.log").read_text(errors="replace")
            raise AssertionError(f"volfsd serve exited {proc.returncode}:\n{log_text[-2000:]}")
        return proc

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

    def cleanup(self, passed: bool = False) -> None:
        """Stop the daemon and its workers and detach what is left; if the test *passed*,
        first check that no worker leaked descriptors."""
        try:
            if passed:
                self.check_fds()
        finally:
            daemon = stop_daemon(self.run)
            for entry in mounts.volfs_mounts():
                if entry.mountpoint.startswith(str(self.tmp)):
                    mounts.detach(entry.mountpoint, lazy=True)
            if daemon:
                wait_gone(daemon, 10)
            for proc in self._daemons:  # reaped, so no zombie outlives the test
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
