"""What the tests share: waiting for a condition, running the CLI, ending processes, root-only.

One of each, so that a test never grows its own sleep loop or subprocess call to ``volfsd``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest

from volfs import mounts

T = TypeVar("T")

#: The CLI, run by the interpreter of the tests (the editable install's).
VOLFSD = [sys.executable, "-m", "volfs"]


def needs_root(why: str) -> pytest.MarkDecorator:
    """Skip the test (or module, as ``pytestmark``) unless it runs as root; *why* is the
    reason pytest shows ("bind mounts need root")."""
    return pytest.mark.skipif(os.geteuid() != 0, reason=why)


# -- waiting -----------------------------------------------------------------------------------


def wait_until(
    condition: Callable[[], T],
    what: str,
    timeout: float = 30,
    interval: float = 0.05,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call *condition* every *interval* s until it returns something true, and return that.

    Exceptions of the types in *ignore* count as "not yet" (a file read while it is being
    replaced, a path on a mount that is healing). After *timeout* s it fails, naming *what*
    it waited for. Never a fixed sleep: a test waits exactly as long as it must.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = condition()
        except ignore:
            result = None  # type: ignore[assignment]
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# -- the CLI -----------------------------------------------------------------------------------


def run_dir_of(root: Path) -> Path:
    """The daemon runtime dir that goes with a test's store root: private to the test."""
    return root.parent / "run"


def cli_env(root: Path, run_dir: Path | None = None) -> dict[str, str]:
    """The environment for the CLI with *root* as store root and a runtime dir of its own."""
    run_dir = run_dir_of(root) if run_dir is None else run_dir
    return {**os.environ, "VOLFS_ROOT": str(root), "VOLFS_RUN_DIR": str(run_dir)}


def volfsd(
    *args: str,
    root: Path,
    run_dir: Path | None = None,
    check: bool = True,
    timeout: float = 120,
    **kwargs: Any,
) -> subprocess.CompletedProcess[str]:
    """Run ``volfsd ARGS`` with *root* as the store root; return rc, stdout and stderr (text).

    With *check*, a non-zero exit fails the test with the CLI's stderr.
    """
    done = subprocess.run(
        [*VOLFSD, *args], env=cli_env(root, run_dir), capture_output=True, text=True,
        timeout=timeout, **kwargs,
    )  # fmt: skip
    if check and done.returncode != 0:
        raise AssertionError(f"volfsd {' '.join(args)} failed: {done.stderr.strip()}")
    return done


def assert_one_line_error(done: subprocess.CompletedProcess[Any], *words: str, rc: int = 1) -> str:
    """*done* failed with exit status *rc* and one line ``volfsd: ...`` holding each of *words*."""
    stderr = done.stderr.decode(errors="replace") if isinstance(done.stderr, bytes) else done.stderr
    assert done.returncode == rc, done
    assert stderr.startswith("volfsd: ") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr, stderr
    for word in words:
        assert word in stderr, stderr
    return stderr


def as_nobody(*argv: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run *argv* as uid and gid 65534 with no supplementary groups; output captured as text."""
    return as_user(65534, *argv, env=env)


def as_user(
    uid: int, *argv: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run *argv* as *uid*, with the gid of that number and no supplementary groups; output
    captured as text."""
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


# -- processes ---------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """Whether *pid* runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as st:
        return st.read().split(") ", 1)[1][0] != "Z"
    return False


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait up to *timeout* s for *pid* to end; whether it did."""
    with contextlib.suppress(AssertionError):
        wait_until(lambda: not alive(pid), f"pid {pid} to end", timeout, interval=0.02)
    return not alive(pid)


def end(pid: int, grace: float) -> None:
    """SIGTERM *pid*, and SIGKILL it if it has not ended after *grace* s."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not wait_gone(pid, grace):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 10)


def pid_in(path: Path) -> int | None:
    """The pid a pid or lock file holds (its first word), or None."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def processes(marker: bytes, env_prefix: bytes | None = None) -> list[int]:
    """Pids whose command line holds *marker* (and, if given, an environment variable
    starting with *env_prefix*)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if marker not in (entry / "cmdline").read_bytes():
                continue
            if env_prefix is not None:
                env = (entry / "environ").read_bytes().split(b"\0")
                if not any(e.startswith(env_prefix) for e in env):
                    continue
            if alive(int(entry.name)):
                pids.append(int(entry.name))
    return pids


def workers_of(run_dir: Path) -> list[int]:
    """Pids of the mount workers a daemon with runtime dir *run_dir* started."""
    return processes(b"--run-dir\0" + str(run_dir).encode() + b"\0")


def stop_daemon(run_dir: Path) -> int | None:
    """Stop the daemon of *run_dir* (if any) and every worker it started; return its pid.

    SIGTERM alone is a hand-off (the workers go on serving), so first `umount --all`, the
    full stop; then SIGTERM, and SIGKILL for a daemon or worker that hangs.
    """
    pid = pid_in(run_dir / "volfsd.pid")
    if pid is not None and alive(pid):
        with contextlib.suppress(subprocess.TimeoutExpired):
            volfsd("umount", "--all", root=run_dir.parent / "store", run_dir=run_dir,
                   check=False, timeout=150)  # fmt: skip
        end(pid, grace=60)
    for worker in workers_of(run_dir):
        end(worker, grace=30)
    return pid


def stop_foreground(proc: subprocess.Popen[Any], mnt: Path) -> None:
    """End a `volfsd mount -f` process (SIGTERM, then SIGKILL) and detach what it left."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if mounts.find_mount(mnt) is not None:
        mounts.detach(mnt, lazy=True)
