"""A real, private Docker engine for the tests, and the tiny image its containers run.

The project tests containers against a real engine, never a mock. There is no network and no
registry here, so the engine is Debian's ``docker.io`` (dockerd 20.10 with its own containerd and
runc), started as root with every path it writes under one temporary directory, and the image is
imported from busybox-static. Everything it starts is stopped at :meth:`DockerEngine.stop`: the
containers, dockerd, its containerd and the shims, and every mount it left under its directory.

The client is Debian's ``/usr/bin/docker`` from the same package as dockerd, not whatever
``docker`` comes first on PATH: a fresh CI machine has only that one, and client and daemon of one
release need no API version negotiation. (The machine image's /usr/local/bin/docker 28.x also
works against this dockerd, negotiating API 1.41, but it would be a second combination to keep
working, and it is not what install.sh installs.)
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from volfs import mounts

DOCKERD = Path("/usr/sbin/dockerd")
DOCKER = Path("/usr/bin/docker")
COMPOSE = Path("/usr/bin/docker-compose")  # compose v1 (1.29), Debian's: docker-py underneath
BUSYBOX = Path("/bin/busybox")  # busybox-static: needs no libraries inside the image
FLOCK = Path("/usr/bin/flock")  # Debian's busybox has no flock applet

IMAGE = "volfs-test"
APPLETS = (
    "sh", "ls", "cat", "echo", "sleep", "dd", "stat", "id", "touch", "rm", "rmdir", "ln", "mkdir",
    "mv", "sync", "tail", "head", "wc", "grep", "sed", "true", "false", "kill", "env", "readlink",
)  # fmt: skip

# Flags that keep the engine off the host's network, firewall and global state: no bridge and no
# iptables rules (there is no network to reach anyway), vfs storage (needs no overlay support and
# leaves no overlay mounts; it copies the image per container, so the image stays tiny).
DOCKERD_FLAGS = (
    "--iptables=false",
    "--ip6tables=false",
    "--bridge=none",
    "--storage-driver=vfs",
)

# dockerd looks up containerd, containerd-shim-runc-v2, runc and docker-init on PATH: take
# Debian's, the ones the package was built and tested with, whatever else PATH holds.
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

# dockerd creates /run/docker/plugins and containerd /run/containerd/s (shim sockets, removed
# with their shims) whatever the flags say. Those directories are left in place: another engine
# on the machine may be using them, and an empty directory in /run costs nothing.


class EngineError(RuntimeError):
    """The engine could not be started (or stopped cleanly); the message says why."""


class DockerCommandError(AssertionError):
    """A docker client command that was expected to succeed failed."""

    def __init__(self, result: subprocess.CompletedProcess[str]) -> None:
        self.result = result
        args = " ".join(str(a) for a in result.args[1:])
        super().__init__(
            f"docker {args} exited {result.returncode}: "
            f"{result.stderr.strip() or result.stdout.strip()}"
        )


def _log_tail(path: Path, lines: int = 15) -> str:
    """The end of dockerd's log, as far as it explains a failure.

    dockerd logs every gRPC state change at level info; the lines that say what went wrong are
    the errors, fatals and warnings and the plain lines it prints as it exits.
    """
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    every = text.splitlines()
    telling = [
        line
        for line in every
        if not line.startswith("time=") or re.search(r"level=(warning|error|fatal)", line)
    ]
    return "\n".join((telling or every)[-lines:])


def _mountpoints_under(base: Path) -> list[str]:
    """Mount points at or below *base* in our mount namespace, the most recent first.

    Later mounts can sit on top of or inside earlier ones, so they must go first.
    """
    prefix = str(base).rstrip("/") + "/"
    points = [e.mountpoint for e in mounts.mount_table()]
    return [p for p in reversed(points) if p == str(base) or p.startswith(prefix)]


def _processes() -> Iterator[tuple[int, int, str, str]]:
    """(pid, ppid, cmdline, cgroups) of every process that is still alive (not a zombie)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            cgroups = (entry / "cgroup").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state != "Z":
            yield int(entry.name), int(ppid), cmdline, cgroups


def _wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    """Wait up to *timeout* s for *pids* to end; return those still alive."""
    deadline = time.monotonic() + timeout
    while True:
        alive = {p for p, *_ in _processes()}
        left = [p for p in pids if p in alive]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


class DockerEngine:
    """A dockerd of our own, with its data root, exec root, socket and pidfile under *base*.

    ``start()`` brings it up and imports :data:`IMAGE`; ``stop()`` takes everything down again.
    Containers started through :meth:`run_container` and :meth:`run` always have ``--network
    none`` and are removed by :meth:`remove_containers` (the fixtures call it after each test).
    """

    def __init__(self, base: Path) -> None:
        self.base = base
        self.data_root = base / "root"
        self.exec_root = base / "exec"
        self.socket = base / "docker.sock"
        self.pidfile = base / "docker.pid"
        self.log_path = base / "dockerd.log"
        self.host = f"unix://{self.socket}"
        self.image = f"{IMAGE}:latest"
        self.process: subprocess.Popen[bytes] | None = None
        self._names = itertools.count()
        self._containers: list[str] = []  # names and ids to remove at the end of a test
        self._ids: set[str] = set()  # every container id seen, to find their processes at stop
        # The client's own config dir: the host's ~/.docker (contexts, credential helpers such
        # as docker-credential-gcloud) must not change what the tests' commands do.
        self._env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        self._env.update(DOCKER_HOST=self.host, DOCKER_CONFIG=str(base / "client"))

    # -- the client ------------------------------------------------------------------------

    def docker(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the docker client against this engine; output captured as text."""
        result = subprocess.run(
            [str(DOCKER), *args],
            env=self._env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )
        if check and result.returncode != 0:
            raise DockerCommandError(result)
        return result

    def compose(
        self, compose_file: Path, project: str, *args: str, check: bool = True, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        """Run ``docker-compose -f COMPOSE_FILE -p PROJECT ARGS`` against this engine.

        Its containers are this engine's like any other: `remove_containers` removes them.
        """
        result = subprocess.run(
            [str(COMPOSE), "--ansi", "never", "-f", str(compose_file), "-p", project, *args],
            env=self._env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise DockerCommandError(result)
        return result

    def _new_name(self) -> str:
        # Registered before `docker run` so that a container that was created but whose run
        # then failed or timed out is removed as well.
        name = f"volfs-test-{os.getpid()}-{next(self._names)}"
        self._containers.append(name)
        return name

    @staticmethod
    def _refuse_network(args: Sequence[str]) -> None:
        if any(a == "--net" or a.startswith(("--network", "--net=")) for a in args):
            raise ValueError("test containers always run with --network none")

    def run_container(self, *args: str, timeout: float = 60) -> str:
        """``docker run -d --network none ARGS``: start a container, return its id.

        *args* are the options, the image and the command, e.g.
        ``run_container("-v", f"{mnt}:/p", engine.image, "sleep", "600")``. Keep it running with
        a long ``sleep`` and drive it with :meth:`exec`; it is removed by
        :meth:`remove_containers`.
        """
        self._refuse_network(args)
        name = self._new_name()
        done = self.docker("run", "-d", "--network", "none", "--name", name, *args, timeout=timeout)
        container = done.stdout.strip()
        self._ids.add(container)
        return container

    def run(
        self, *args: str, check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``docker run --network none ARGS`` in the foreground; the container is removed after.

        Returns the client's result: the container's stdout, stderr and exit status.
        """
        self._refuse_network(args)
        name = self._new_name()
        interactive = ("-i",) if input is not None else ()
        try:
            return self.docker(
                "run", "--network", "none", "--name", name, *interactive, *args,
                check=check, timeout=timeout, input=input,
            )  # fmt: skip
        finally:
            self.docker("rm", "-f", name, check=False)

    def exec(
        self,
        container: str,
        *command: str,
        user: str | None = None,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``docker exec`` *command* in a running container; its stdout, stderr, exit status.

        With ``check=False`` a failing command is returned, not raised: its ``returncode`` is
        the command's exit status (docker itself uses 125-127 for its own failures).
        """
        options = [*(("-u", user) if user is not None else ())]
        if input is not None:
            options.append("-i")  # without it, docker exec gives the command no stdin
        return self.docker(
            "exec", *options, container, *command, check=check, timeout=timeout, input=input
        )

    def remove_containers(self) -> None:
        """Remove (``rm -f``: SIGKILL, then delete) every container of this engine."""
        listed = self.docker("ps", "-aq", "--no-trunc", check=False, timeout=60).stdout.split()
        self._ids.update(listed)
        every = [*self._containers, *listed]
        self._containers.clear()
        if every:
            # Names registered for a `run` that never created its container are "No such
            # container" here, which is fine; whatever still exists afterwards is an error.
            self.docker("rm", "-f", *every, check=False, timeout=120)
        left = self.docker("ps", "-aq", check=False).stdout.split()
        if left:
            raise EngineError(f"docker rm -f left containers behind: {left}")

    # -- starting --------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        """Start dockerd, wait until it answers, import the test image."""
        for tool in (DOCKERD, DOCKER, COMPOSE, BUSYBOX, FLOCK):
            if not tool.exists():
                raise EngineError(f"{tool} is missing: run ./install.sh --dev (as root)")
        if os.geteuid() != 0:
            raise EngineError("the Docker engine of the tests needs root")
        self.base.mkdir(parents=True, exist_ok=True)
        # A daemon.json of our own: a host's /etc/docker/daemon.json must not configure this
        # engine, and the engine's trust key goes here instead of /etc/docker/key.json.
        config = self.base / "daemon.json"
        config.write_text(json.dumps({"deprecated-key-path": str(self.base / "key.json")}))
        argv = [
            str(DOCKERD), *DOCKERD_FLAGS,
            f"--data-root={self.data_root}", f"--exec-root={self.exec_root}",
            f"--host={self.host}", f"--pidfile={self.pidfile}", f"--config-file={config}",
        ]  # fmt: skip
        with open(self.log_path, "wb") as log:
            # A session of its own: a Ctrl-C at the terminal must not stop the engine behind
            # the fixture's back; stop() does that, in order.
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={"PATH": SYSTEM_PATH, "HOME": str(self.base)},
                start_new_session=True,
            )
        self._wait_ready(timeout)
        self._build_image()

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EngineError(
                    f"dockerd exited with status {self.process.returncode} before it was "
                    f"ready; from its log:\n{_log_tail(self.log_path)}"
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                info = self.docker("info", "--format", "{{.ServerVersion}}", check=False,
                                   timeout=10)  # fmt: skip
                if info.returncode == 0:
                    return
                last = info.stderr.strip()
            time.sleep(0.1)
        raise EngineError(
            f"dockerd did not answer `docker info` within {timeout} s ({last}); from its log:\n"
            f"{_log_tail(self.log_path)}"
        )

    def _build_image(self) -> None:
        """Import a busybox root with flock as :data:`IMAGE` (no registry to pull from)."""
        root = self.base / "image-root"
        if root.exists():
            shutil.rmtree(root)
        # 0755, not mkdtemp's 0700: a container's root directory keeps its mode, and a non-root
        # --user could not even exec /bin/sh under 0700.
        for sub in ("bin", "usr/bin", "etc"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(exist_ok=True)
        root.chmod(0o755)
        (root / "tmp").chmod(0o1777)
        shutil.copy2(BUSYBOX, root / "bin/busybox")
        for applet in APPLETS:
            (root / "bin" / applet).symlink_to("busybox")
        shutil.copy2(FLOCK, root / "usr/bin/flock")
        for lib in self._libraries(FLOCK):
            target = root / lib.relative_to("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(lib, target)  # follows symlinks: the real file under the ldd name
        for path in root.rglob("*"):
            if path.is_dir() and not path.is_symlink() and path.name != "tmp":
                path.chmod(0o755)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        try:
            imported = subprocess.run(
                [str(DOCKER), "import", "-", self.image],
                stdin=tar.stdout,
                env=self._env,
                capture_output=True,
                text=True,
                timeout=120,
            )
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait(timeout=60)
        if imported.returncode != 0 or tar.returncode != 0:
            raise EngineError(f"docker import of {self.image} failed: {imported.stderr.strip()}")

    @staticmethod
    def _libraries(binary: Path) -> list[Path]:
        """The shared libraries (and loader) that ldd says *binary* needs."""
        out = subprocess.run(
            ["ldd", str(binary)], capture_output=True, text=True, check=True, timeout=30
        ).stdout
        libs = []
        for line in out.splitlines():
            # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
            for word in line.split():
                if word.startswith("/"):
                    libs.append(Path(word))
        return libs

    # -- stopping --------------------------------------------------------------------------

    def stop(self) -> None:
        """Take everything down: containers, dockerd, containerd, shims, mounts, the directory.

        Every step runs even if an earlier one failed; what could not be cleaned up is raised
        as one :class:`EngineError` at the end.
        """
        problems: list[str] = []
        if self.process is not None and self.process.poll() is None:
            try:
                self.remove_containers()
            except (EngineError, subprocess.TimeoutExpired, OSError) as exc:
                problems.append(f"removing containers: {exc}")
        self._stop_dockerd(problems)
        self._kill_leftover_processes(problems)
        self._unmount_leftovers(problems)
        if not _mountpoints_under(self.base):
            shutil.rmtree(self.base, ignore_errors=True)
        else:
            # Never rmtree through a mount: it could reach into a volume or the host.
            problems.append(f"not removing {self.base}: something is still mounted in it")
        if problems:
            raise EngineError("the Docker engine did not stop cleanly:\n" + "\n".join(problems))

    def _stop_dockerd(self, problems: list[str]) -> None:
        process = self.process
        if process is None:
            return
        with contextlib.suppress(OSError, ValueError):
            from_file = int(self.pidfile.read_text().split()[0])
            if from_file != process.pid:
                problems.append(f"{self.pidfile} names pid {from_file}, not ours {process.pid}")
        if process.poll() is None:
            # SIGTERM: dockerd stops its containers (none are left by now), then its
            # containerd, and removes its netns mounts and pidfile.
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                problems.append(
                    f"dockerd ignored SIGTERM for 30 s; killed. The end of its log:\n"
                    f"{_log_tail(self.log_path)}"
                )
                process.kill()
                process.wait(timeout=30)

    def _kill_leftover_processes(self, problems: list[str]) -> None:
        """SIGKILL whatever of this engine outlived dockerd: containerd, shims, containers.

        containerd is dockerd's child, but each containerd-shim-runc-v2 is reparented to pid 1
        and the container's processes are the shim's children: all of them name a path under
        our base directory on their command line, descend from a process that does, or are in
        the cgroup of one of our containers (named by its id: a container's processes whose
        shim died are pid 1's children).
        """
        marker = f"{self.base}/"
        for _ in range(10):
            procs = list(_processes())
            ours = {
                pid
                for pid, _, cmdline, cgroups in procs
                if marker in cmdline or any(c in cgroups for c in self._ids)
            }
            grew = True
            while grew:  # add the descendants of what we have
                more = {pid for pid, ppid, *_ in procs if ppid in ours} - ours
                ours |= more
                grew = bool(more)
            ours.discard(os.getpid())
            if not ours:
                return
            # Wait a little first: containerd may still be on its way out after dockerd.
            left = _wait_gone(sorted(ours), 5)
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            still = _wait_gone(left, 10)
            if left:
                problems.append(f"processes of the engine outlived dockerd, killed: {left}")
            if still:
                problems.append(f"processes of the engine survive SIGKILL: {still}")
                return

    def _unmount_leftovers(self, problems: list[str]) -> None:
        """Unmount what the engine left mounted under its directory (netns, shm, data root)."""
        for _ in range(10):
            points = _mountpoints_under(self.base)
            if not points:
                return
            for point in points:
                done = subprocess.run(["umount", point], capture_output=True, timeout=60)
                if done.returncode != 0:
                    subprocess.run(["umount", "-l", point], capture_output=True, timeout=60)
        left = _mountpoints_under(self.base)
        if left:
            problems.append(f"mounts under {self.base} could not be removed: {left}")
