"""``volfsd serve``: the supervisor of a host's volumes.

The daemon owns the store root and a runtime directory.  It answers requests on a unix socket
(see control.py) and runs one mount worker per served volume: the worker mounts the volume at
a *staging* path under the runtime directory, and every mount point a user asks for is a bind
mount of that staging mount (the model Kubernetes CSI uses).  So all paths of a volume are one
file system: the same bytes, the same POSIX and flock locks, at once.

If a worker dies, the daemon clears its dead mounts and brings the volume back at all its
paths.  SIGTERM unmounts everything cleanly and exits 0.  Without root there are no bind
mounts: a volume is then mounted directly, at one path only.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import trio

from volfs import control, mounts
from volfs.errors import VolfsError
from volfs.store import pidlock
from volfs.store.root import StoreRoot, check_name
from volfs.volumes import (
    check_mountpoint,
    clear_dead_mount,
    describe,
    parse_inodes,
    parse_size,
    prepare_mountpoint,
)

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("/etc/volfs/volumes.toml")
REMEMBERED = "mounts.msgpack"
READY_TIMEOUT = 60.0
#: How long a worker whose mounts are gone may take to end by itself before it gets SIGTERM.
STOP_GRACE = 10.0
#: How long a worker may take to end after SIGTERM (it checkpoints first) before it is killed.
STOP_TIMEOUT = 120.0
REQUEST_READ_TIMEOUT = 10.0
RESTART_DELAYS = (0.5, 1, 2, 5, 10, 30)


_CONFIG_KEYS = ("paths", "size", "read_only", "labels", "inodes")


def load_config(path: Path) -> dict[str, dict]:
    """The volumes a config file declares: name -> {"paths", "size", "read_only", "labels",
    "inodes"}."""
    try:
        with open(path, "rb") as f:
            config = tomllib.load(f)
    except FileNotFoundError:
        raise VolfsError(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise VolfsError(f"config file {path} is not valid TOML: {exc}") from None
    volumes = config.get("volumes", {})
    if not isinstance(volumes, dict) or set(config) - {"volumes"}:
        raise VolfsError(f"config file {path}: expected only [volumes.NAME] tables")
    declared = {}
    for name, spec in volumes.items():
        where = f"config file {path}, volume {name!r}"
        try:
            check_name(name)
        except VolfsError as exc:
            raise VolfsError(f"{where}: {exc}") from None
        if not isinstance(spec, dict) or set(spec) - set(_CONFIG_KEYS):
            raise VolfsError(f"{where}: allowed keys are {', '.join(_CONFIG_KEYS)}")
        paths = spec.get("paths", [])
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise VolfsError(f"{where}: paths must be a list of absolute paths")
        labels = spec.get("labels", {})
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise VolfsError(f"{where}: labels must be a table of strings")
        declared[name] = {
            "paths": [check_mountpoint(p) for p in paths],
            "size": parse_size(spec["size"]) if "size" in spec else 0,
            "read_only": bool(spec.get("read_only", False)),
            "labels": labels,
            "inodes": _config_inodes(spec, where),
        }
    return declared


def _config_inodes(spec: dict, where: str) -> int:
    try:
        return parse_inodes(spec["inodes"]) if "inodes" in spec else 0
    except VolfsError as exc:
        raise VolfsError(f"{where}: {exc}") from None


def notify(state: str) -> None:
    """Tell systemd (Type=notify) about *state*, if it is listening."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock,
    ):
        sock.sendto(state.encode(), address)


@dataclass
class Served:
    """A volume this daemon serves: its worker, staging mount and user mount points."""

    name: str
    staging: Path
    paths: list[Path] = field(default_factory=list)
    read_only: set[Path] = field(default_factory=set)
    process: trio.Process | None = None
    status: str = "starting"
    stopping: bool = False
    restarts: int = 0


class Daemon:
    def __init__(self, root: StoreRoot, run_dir: Path, config: Path | None) -> None:
        self.root = root
        self.run_dir = run_dir
        self.config_path = config
        self.served: dict[str, Served] = {}
        #: Volumes unmounted whose worker has not ended yet (files open on a lazy unmount).
        self.stopping: dict[str, Served] = {}
        self._admin = trio.Lock()  # one change of mounts at a time
        self._nursery: trio.Nursery | None = None
        self._started = time.time()
        self._bind = os.geteuid() == 0  # bind mounts need root

    # -- life cycle -------------------------------------------------------------------------

    def _take_run_dir(self) -> int:
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o700)
        dir_fd = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return pidlock.take("volfsd.pid", dir_fd)
        except pidlock.LockHeld as held:
            raise VolfsError(
                f"another volfsd (pid {held.holder}) already serves {self.run_dir}: "
                "stop it first, or set VOLFS_RUN_DIR to another directory"
            ) from None
        finally:
            os.close(dir_fd)

    async def run(self) -> None:
        pid_fd = self._take_run_dir()
        try:
            listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
            path = self.run_dir / control.SOCKET_NAME
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # stale: we hold the run dir's lock, nobody else listens on it
            old_umask = os.umask(0o177)  # born 0600: only the socket's owner can drive us
            try:
                await listener.bind(str(path))
            finally:
                os.umask(old_umask)
            listener.listen(64)
            # Signals are caught from here on, so a stop during start-up still unmounts.
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._accept, listener)
                    await self._mount_declared()
                    await self._mount_remembered()
                    log.info("volfsd ready: store %s, socket %s", self.root.path, path)
                    notify("READY=1")
                    async for signum in signals:
                        log.info("received %s", signal.Signals(signum).name)
                        break
                    notify("STOPPING=1")
                    log.info("stopping: unmounting every volume")
                    await self._stop_all()
                    nursery.cancel_scope.cancel()
        finally:
            with contextlib.suppress(OSError):
                (self.run_dir / control.SOCKET_NAME).unlink()
            os.close(pid_fd)

    async def _mount_declared(self) -> None:
        if self.config_path is None:
            return
        declared = load_config(self.config_path)
        async with self._admin:
            for name, spec in declared.items():
                try:
                    self.root.create_volume(
                        name, size=spec["size"], labels=spec["labels"], inodes=spec["inodes"]
                    )
                    for path in spec["paths"]:
                        await self._mount(name, path, spec["read_only"])
                except VolfsError as exc:
                    log.error("declared volume %s: %s", name, exc)

    # Mounts made on request are remembered in the runtime dir, so a daemon that restarts
    # (a crash, an upgrade, systemctl restart) brings them back; a reboot clears /run and them.

    def _remembered(self) -> list[list]:
        try:
            entries = msgpack.unpackb((self.run_dir / REMEMBERED).read_bytes())
        except (OSError, ValueError, msgpack.UnpackException):
            return []
        if not isinstance(entries, list):
            return []
        return [e for e in entries if isinstance(e, list) and len(e) == 3]

    def _remember(self, name: str, path: Path, read_only: bool, keep: bool) -> None:
        entries = [e for e in self._remembered() if e[1] != str(path)]
        if keep:
            entries.append([name, str(path), read_only])
        tmp = self.run_dir / (REMEMBERED + ".tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(tmp, flags, 0o600), "wb") as f:
            f.write(msgpack.packb(entries))
        tmp.rename(self.run_dir / REMEMBERED)

    async def _mount_remembered(self) -> None:
        async with self._admin:
            for name, path, read_only in self._remembered():
                try:
                    await self._mount(check_name(name), check_mountpoint(path), bool(read_only))
                except (VolfsError, TypeError) as exc:
                    log.error("could not mount %s at %s again: %s", name, path, exc)
                    self._remember(str(name), Path(str(path)), False, keep=False)

    async def _stop_all(self) -> None:
        """Unmount every volume, then wait for all their workers at once."""
        async with self._admin:
            for served in list(self.served.values()):
                try:
                    await self._detach_volume(served, lazy=True)
                except VolfsError as exc:  # stop the others all the same
                    log.error("volume %s: %s", served.name, exc)
            async with trio.open_nursery() as nursery:
                for served in list(self.stopping.values()):
                    nursery.start_soon(self._wait_stopped, served, STOP_GRACE)

    # -- requests -----------------------------------------------------------------------------

    async def _accept(self, listener) -> None:
        while True:
            try:
                conn, _ = await listener.accept()
            except OSError as exc:  # out of file descriptors, say: wait, do not die
                log.error("cannot accept a connection: %s", exc)
                await trio.sleep(0.5)
                continue
            self._nursery.start_soon(self._serve_connection, conn)

    def _peer_allowed(self, conn) -> bool:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        _pid, uid, _gid = (int.from_bytes(creds[i : i + 4], "little") for i in (0, 4, 8))
        return uid in (0, os.geteuid())

    async def _serve_connection(self, conn) -> None:
        """Answer one request; nothing a client sends or does may take the daemon down."""
        stream = trio.SocketStream(conn)
        try:
            if not self._peer_allowed(conn):
                reply = {"ok": False, "error": "permission denied: not the daemon's owner"}
            else:
                reply = await self._answer(stream)
            await stream.send_all(control.encode(reply))
            await stream.send_eof()
            with trio.move_on_after(1):  # drain what a bad client sent, so close() sends no RST
                while await stream.receive_some(65536):
                    pass
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except Exception:
            log.exception("connection failed")
        finally:
            await stream.aclose()

    async def _answer(self, stream: trio.SocketStream) -> dict:
        try:
            with trio.fail_after(REQUEST_READ_TIMEOUT):
                length = control.frame_length(await _recv_exactly(stream, 4))
                request = control.decode_body(await _recv_exactly(stream, length))
            cmd, args = request.get("cmd"), request.get("args", {})
            handler = self.COMMANDS.get(cmd) if isinstance(cmd, str) else None
            if handler is None:
                raise control.ProtocolError(f"unknown command {str(cmd)[:40]!r}")
            if not isinstance(args, dict):
                raise control.ProtocolError("args must be a map")
            return {"ok": True, "result": await handler(self, **checked_args(handler, args))}
        except trio.TooSlowError:
            return {"ok": False, "error": "malformed request: incomplete frame"}
        except control.ProtocolError as exc:
            return {"ok": False, "error": f"malformed request: {exc}"}
        except VolfsError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception:
            log.exception("request failed")
            return {"ok": False, "error": "internal error in volfsd; see its log"}

    def _describe(self, name: str) -> dict:
        served = self.served.get(name)
        if served is None:
            return describe(self.root, name)
        return describe(self.root, name, served.status, served.staging, served.read_only)

    # -- commands -------------------------------------------------------------------------------

    async def cmd_create(
        self, name: str, size: str | int = 0, labels: dict | None = None, inodes: str | int = 0
    ):
        labels = labels or {}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise VolfsError("labels must be KEY=VALUE strings")
        limit = parse_inodes(inodes) if inodes else 0
        self.root.create_volume(check_name(name), parse_size(size) if size else 0, labels,
                                inodes=limit)  # fmt: skip
        return self._describe(name)

    async def cmd_ls(self):
        return [self._describe(n) for n in self.root.names()]

    async def cmd_inspect(self, names: list):
        result = []
        for name in names:
            if not isinstance(name, str) or not self.root.exists(check_name(name)):
                raise VolfsError(f"no such volume: {str(name)[:80]}")
            result.append(self._describe(name))
        return result

    async def cmd_status(self):
        return {
            "pid": os.getpid(),
            "store": str(self.root.path),
            "socket": str(self.run_dir / control.SOCKET_NAME),
            "uptime": round(time.time() - self._started, 1),
            "volumes": {n: {"status": s.status, "mounts": [str(p) for p in s.paths],
                            "restarts": s.restarts} for n, s in self.served.items()},
        }  # fmt: skip

    async def cmd_mount(
        self,
        name: str,
        mountpoint: str,
        read_only: bool = False,
        size: str | int = 0,
        inodes: str | int = 0,
    ):
        check_name(name)
        path = check_mountpoint(mountpoint)
        size_bytes = parse_size(size) if size else 0
        limit = parse_inodes(inodes) if inodes else 0
        async with self._admin:
            if self.root.exists(name):
                header = self.root.header(name)
                current = header.get("size", 0)
                if size_bytes and current != size_bytes:
                    raise VolfsError(
                        f"volume {name} exists with size {current}: its size is set at creation"
                    )
                if limit and header.get("inodes", 0) != limit:
                    raise VolfsError(
                        f"volume {name} exists with inode limit {header.get('inodes', 0)}: "
                        "its limit is set at creation"
                    )
            else:
                self.root.create_volume(name, size=size_bytes, inodes=limit)
            await self._mount(name, path, read_only)
            self._remember(name, path, read_only, keep=True)
        return self._describe(name)

    async def cmd_umount(self, mountpoint: str, lazy: bool = False):
        path = check_mountpoint(mountpoint)
        async with self._admin:
            served = next((s for s in self.served.values() if path in s.paths), None)
            if served is None:
                raise VolfsError(f"{path} is not a volume mount of this daemon")
            await self._unmount_path(served, path, lazy)
            self._remember(served.name, path, False, keep=False)
            if served.paths:
                return {"mountpoint": str(path)}
            await self._detach_volume(served, lazy=lazy)
        if lazy:  # files may stay open on it: the worker serves them until they are closed
            self._nursery.start_soon(self._wait_stopped, served, math.inf)
        else:  # the worker ends once it has checkpointed; wait outside the lock for that
            await self._wait_stopped(served, STOP_GRACE)
        return {"mountpoint": str(path)}

    async def cmd_rm(self, name: str, force: bool = False):
        check_name(name)
        async with self._admin:
            if not self.root.exists(name):
                raise VolfsError(f"no such volume: {name}")
            served = self.served.get(name)
            if served is not None:
                if not force:
                    mounted = ", ".join(str(p) for p in served.paths) or str(served.staging)
                    raise VolfsError(
                        f"volume {name} is mounted at {mounted}: unmount it first or use --force"
                    )
                for path in list(served.paths):
                    self._remember(name, path, False, keep=False)
                await self._detach_volume(served, lazy=True)
            if name in self.stopping:
                await self._wait_stopped(self.stopping[name], STOP_GRACE)
            if self.root.is_served(name):
                raise VolfsError(f"volume {name} is being served by another process")
            self.root.remove_volume(name)
        return {"name": name}

    async def cmd_resize(self, name: str, size: str | int, inodes: str | int = 0):
        check_name(name)
        limit = parse_inodes(inodes) if inodes else None
        async with self._admin:
            if not self.root.exists(name):
                raise VolfsError(f"no such volume: {name}")
            if name in self.served or name in self.stopping or self.root.is_served(name):
                raise VolfsError(
                    f"volume {name} is mounted: unmount it to resize it "
                    "(a mounted volume cannot be resized yet)"
                )
            # Loading the volume (to know what it holds) may take seconds: not in the loop.
            await trio.to_thread.run_sync(self.root.resize, name, parse_size(size), limit)
        return self._describe(name)

    COMMANDS = {
        "create": cmd_create,
        "ls": cmd_ls,
        "inspect": cmd_inspect,
        "status": cmd_status,
        "mount": cmd_mount,
        "umount": cmd_umount,
        "rm": cmd_rm,
        "resize": cmd_resize,
    }

    # -- mounting -------------------------------------------------------------------------------

    async def _mount(self, name: str, path: Path, read_only: bool) -> None:
        served = self.served.get(name)
        if served is not None and path in served.paths:
            if read_only != (path in served.read_only):
                mode = "read-only" if path in served.read_only else "read-write"
                raise VolfsError(f"volume {name} is already mounted {mode} at {path}")
            return  # asked again for what is there: nothing to do
        if served is not None and not self._bind:
            raise VolfsError(
                f"volume {name} is already mounted at {served.paths[0]}: a second mount point "
                "needs bind mounts, which need root"
            )
        prepare_mountpoint(path)
        leaving = self.stopping.get(name) if served is None else None
        if leaving is not None and leaving.process is not None:
            with trio.move_on_after(STOP_GRACE):
                await leaving.process.wait()
            if leaving.process.returncode is None:
                raise VolfsError(
                    f"volume {name} is still being unmounted: files are open on a path "
                    "unmounted with --lazy; close them and try again"
                )
        if served is None:
            if self.root.is_served(name):
                raise VolfsError(
                    f"volume {name} is being served by another process (volfsd mount -f?)"
                )
            staging = self.run_dir / "staging" / name if self._bind else path
            served = Served(name, staging)
            await self._start_worker(served)
            self.served[name] = served
            self._nursery.start_soon(self._supervise, served)
        if self._bind:
            await self._bind_mount(served.staging, path, read_only)
        served.paths.append(path)
        if read_only:
            served.read_only.add(path)
        log.info("volume %s mounted at %s%s", name, path, " (read-only)" if read_only else "")

    async def _bind_mount(self, staging: Path, path: Path, read_only: bool) -> None:
        await _run(["mount", "--bind", str(staging), str(path)])
        if read_only:
            try:
                await _run(["mount", "-o", "remount,bind,ro", str(path)])
            except VolfsError:
                await _run(["umount", "-l", str(path)])
                raise

    async def _start_worker(self, served: Served) -> None:
        if self._bind:
            served.staging.parent.mkdir(mode=0o700, exist_ok=True)
            served.staging.mkdir(mode=0o700, exist_ok=True)
            if mounts.find_mount(served.staging) is not None:
                mounts.detach(served.staging, lazy=True)  # left by a worker that died
        log_name = f"{served.name}.log"
        ready_r, ready_w = os.pipe()
        args = [sys.executable, "-m", "volfs.worker", "--root", str(self.root.path),
                "--name", served.name, "--mountpoint", str(served.staging),
                "--ready-fd", str(ready_w), "--die-with-parent"]  # fmt: skip
        try:
            with self.root.open_log(log_name) as log_file:
                process = await trio.lowlevel.open_process(
                    args, pass_fds=(ready_w,), stdin=subprocess.DEVNULL,
                    stdout=log_file, stderr=log_file,
                )  # fmt: skip
        finally:
            os.close(ready_w)
        stream = trio.lowlevel.FdStream(ready_r)
        reply = b""
        with trio.move_on_after(READY_TIMEOUT):
            while not reply.endswith(b"\n"):
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                reply += chunk
        await stream.aclose()
        text = reply.decode(errors="replace").strip()
        if text != "ok":
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            reason = text.removeprefix("error: ") or (
                f"the mount worker exited early; see {self.root.log_path(log_name)}"
            )
            raise VolfsError(reason)
        served.process = process
        served.status = "mounted"

    async def _supervise(self, served: Served) -> None:
        """Wait for the worker to end; bring the volume back if nobody asked it to stop."""
        while True:
            await served.process.wait()
            if served.stopping:
                return
            code = served.process.returncode
            log.error("volume %s: its worker exited (%s); remounting at %s", served.name, code,
                      ", ".join(str(p) for p in served.paths))  # fmt: skip
            served.status = "restarting"
            await self._heal(served)
            if served.stopping:
                return

    async def _heal(self, served: Served) -> None:
        for path in served.paths:
            mounts.detach(path, lazy=True)
        if self._bind:
            mounts.detach(served.staging, lazy=True)
        for delay in (*RESTART_DELAYS, *([RESTART_DELAYS[-1]] * 1000)):
            if served.stopping:
                return
            try:
                async with self._admin:
                    await self._start_worker(served)
                    if self._bind:
                        for path in served.paths:
                            await self._bind_mount(served.staging, path, path in served.read_only)
                served.restarts += 1
                log.info("volume %s is back at %s", served.name,
                         ", ".join(str(p) for p in served.paths))  # fmt: skip
                return
            except VolfsError as exc:
                served.status = f"failed: {exc}"
                log.error(
                    "volume %s: restart failed: %s; retrying in %s s", served.name, exc, delay
                )
                await trio.sleep(delay)

    async def _unmount_path(self, served: Served, path: Path, lazy: bool) -> None:
        if mounts.find_mount(path) is None:
            log.warning("volume %s: %s was unmounted behind volfsd's back", served.name, path)
            problem = None
        elif self._bind:
            problem = await trio.to_thread.run_sync(_umount, path, lazy)
        else:
            problem = await trio.to_thread.run_sync(mounts.detach, path, lazy)
        if problem is not None:
            if "busy" in problem.lower():
                raise VolfsError(
                    f"{path} is busy: stop the processes using it, or use --lazy to detach now"
                )
            raise VolfsError(f"cannot unmount {path}: {problem}")
        served.paths.remove(path)
        served.read_only.discard(path)
        log.info("volume %s unmounted from %s", served.name, path)

    async def _detach_volume(self, served: Served, lazy: bool) -> None:
        """Unmount every path of *served* and its staging mount, so that its worker ends.

        Detaching the last mount ends the worker's FUSE session (at once, or with a lazy
        detach once the last open file closes); the worker then checkpoints and exits by
        itself.  It gets SIGTERM only if its staging mount could not be detached.
        `_wait_stopped` waits for the end.
        """
        for path in list(served.paths):
            try:
                await self._unmount_path(served, path, lazy)
            except VolfsError:
                await self._unmount_path(served, path, True)
        served.stopping = True
        self.served.pop(served.name, None)
        self.stopping[served.name] = served
        process = served.process
        if process is None or process.returncode is not None:
            return
        detached = (
            self._bind
            and await trio.to_thread.run_sync(mounts.detach, served.staging, lazy) is None
        )
        if not detached:
            process.send_signal(signal.SIGTERM)

    async def _wait_stopped(self, served: Served, grace: float) -> None:
        """Wait for the worker of a detached volume to end: *grace* s by itself, then
        `STOP_TIMEOUT` s after SIGTERM, then it is killed."""
        process = served.process
        if process is not None and process.returncode is None:
            with trio.move_on_after(grace):
                await process.wait()
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                with trio.move_on_after(STOP_TIMEOUT):
                    await process.wait()
            if process.returncode is None:
                log.error("volume %s: worker did not stop in time; killing it", served.name)
                process.kill()
                await process.wait()
        if self._bind:
            clear_dead_mount(served.staging)
        if self.stopping.get(served.name) is served:
            del self.stopping[served.name]


_ARG_TYPES = {"str": str, "int": int, "bool": bool, "list": list, "dict": dict, "None": type(None)}


def checked_args(handler, args: dict) -> dict:
    """*args* if they fit *handler*'s signature: known names, all required ones, and values of
    the annotated types (``str | int`` and the like)."""
    params = inspect.signature(handler).parameters
    known = [p for p in params if p != "self"]
    unknown = sorted(str(a) for a in set(args) - set(known))
    if unknown:
        raise control.ProtocolError(f"unknown argument {unknown[0][:40]!r}")
    for name in known:
        param = params[name]
        if name not in args:
            if param.default is inspect.Parameter.empty:
                raise control.ProtocolError(f"missing argument {name!r}")
            continue
        types = tuple(_ARG_TYPES[t.strip()] for t in str(param.annotation).split("|"))
        value = args[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join(t.__name__ for t in types)
            raise control.ProtocolError(f"argument {name!r} must be a {names}")
    return args


async def _recv_exactly(stream: trio.SocketStream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            raise control.ProtocolError("connection closed mid-frame")
        data += chunk
    return data


async def _run(args: list[str]) -> None:
    done = await trio.run_process(args, capture_stdout=True, capture_stderr=True, check=False)
    if done.returncode != 0:
        message = (done.stderr.decode(errors="replace").strip().splitlines() or ["failed"])[-1]
        raise VolfsError(f"{' '.join(args[:2])} failed: {message}")


def _umount(path: Path, lazy: bool) -> str | None:
    args = ["umount", "-l", str(path)] if lazy else ["umount", str(path)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if done.returncode == 0:
        return None
    return (done.stderr.strip().splitlines() or ["failed"])[-1]


def serve(config: Path | None) -> None:
    """Run the daemon in this process until SIGTERM or SIGINT."""
    from volfs.store.root import default_root

    root = StoreRoot(default_root())
    if config is None and DEFAULT_CONFIG.exists() and os.geteuid() == 0:
        config = DEFAULT_CONFIG
    if config is not None:
        load_config(config)  # refuse a bad config before taking anything
    trio.run(Daemon(root, control.default_run_dir(), config).run)
