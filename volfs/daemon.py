"""``volfsd serve``: the supervisor of a host's volumes.

The daemon owns the store root and a runtime directory.  It answers requests on a unix socket
(see control.py) and runs one mount worker per served volume: the worker mounts the volume at
a *staging* path under the runtime directory, and every mount point a user asks for is a bind
mount of that staging mount (the model Kubernetes CSI uses).  So all paths of a volume are one
file system: the same bytes, the same POSIX and flock locks, at once.

If a worker dies, the daemon brings the volume back at all its paths (served.py).  Workers
outlive the daemon: SIGTERM (or a crash) of the daemon leaves them serving, and the next
daemon adopts them (workerctl.py); `umount --all` is the full stop.  Without root there are
no bind mounts: a volume is then mounted directly, at one path only.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import signal
import socket
import sys
import time
import tomllib
from pathlib import Path

import msgpack
import trio

from volfs import __version__, control, mounts, sysmount, users, workerctl
from volfs.errors import VolfsError
from volfs.mountpoint import PRESENT, normalize, open_mountpoint, prepare
from volfs.served import DEAD, MOUNTED, REFUSED, MountPath, Served
from volfs.store import pidlock
from volfs.store.root import StoreRoot, check_name
from volfs.catalog import describe, parse_inodes, parse_size
from volfs.workerctl import WorkerProcess

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("/etc/volfs/volumes.toml")
REMEMBERED = "mounts.msgpack"
PID_FILE = "volfsd.pid"
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
            "paths": [normalize(p) for p in paths],
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
            return pidlock.take(PID_FILE, dir_fd)
        except pidlock.LockHeld as held:
            raise VolfsError(
                f"another volfsd (pid {held.holder}) already serves {self.run_dir}: "
                "stop it first, or set VOLFS_RUN_DIR to another directory"
            ) from None
        finally:
            os.close(dir_fd)

    async def run(self) -> None:
        # Not the directory we were started from: a daemon that stays there pins it (a
        # tmpfs it lies on could not be unmounted), and so would every worker it starts.
        os.chdir("/")
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
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._accept, listener)
                    await self._adopt_workers()
                    await self._mount_declared()
                    await self._mount_remembered()
                    log.info("volfsd ready: store %s, socket %s", self.root.path, path)
                    notify("READY=1")
                    async for signum in signals:
                        log.info("received %s", signal.Signals(signum).name)
                        break
                    notify("STOPPING=1")
                    # A hand-off, not a stop: the workers go on serving, and the next daemon
                    # adopts them.  `volfsd umount --all` is the full stop.
                    log.info(
                        "stopping; %d volume(s) stay served by their workers "
                        "(`volfsd umount --all` unmounts them)",
                        len(self.served),
                    )
                    nursery.cancel_scope.cancel()
        finally:
            with contextlib.suppress(OSError):
                (self.run_dir / control.SOCKET_NAME).unlink()
            with contextlib.suppress(OSError):
                (self.run_dir / PID_FILE).unlink()
            os.close(pid_fd)

    async def _adopt_workers(self) -> None:
        """Take over the workers an earlier daemon started, found by their control sockets."""
        for sock in sorted((self.run_dir / workerctl.WORKERS_DIR).glob("*.sock")):
            name = sock.name.removesuffix(".sock")
            try:
                check_name(name)
                status = await workerctl.call(sock, "status")
            except VolfsError:
                continue
            except workerctl.WorkerUnreachable as exc:
                if not self.root.is_served(name):
                    log.info("removing the stale worker socket %s", sock)
                    with contextlib.suppress(OSError):
                        sock.unlink()
                else:
                    log.warning("volume %s: its worker does not answer (%s)", name, exc)
                    self._adopt_silent(name)
                continue
            if status.get("root") != str(self.root.path) or status.get("name") != name:
                log.warning("worker socket %s belongs to another store; left alone", sock)
                continue
            try:
                worker = WorkerProcess(int(status["pid"]), child=False)
            except (ProcessLookupError, KeyError, TypeError, ValueError):
                continue
            served = Served(name, Path(str(status.get("mountpoint"))), worker=worker,
                            device=str(status.get("device", "")), adopted=True)  # fmt: skip
            if status.get("protocol") != workerctl.PROTOCOL:
                served.status = "needs-remount"
                served.problems.append(
                    f"its worker (pid {worker.pid}) is of volfs {status.get('version')}: "
                    "unmount and mount the volume again to update it"
                )
            else:
                served.status = "mounted"
            self._adopt(served)
            log.info("volume %s: adopted its worker (pid %d) and its paths %s", name,
                     worker.pid, ", ".join(map(str, served.paths)) or "(none)")  # fmt: skip

    def _adopt(self, served: Served) -> None:
        """Serve *served* from now on; its paths are the binds of its mount that are there."""
        if served.device:
            for entry in mounts.mount_table():
                path = Path(entry.mountpoint)
                if entry.device == served.device and path != served.staging:
                    served.paths[path] = MountPath(path, entry.read_only)
        self.served[served.name] = served
        assert self._nursery is not None
        self._nursery.start_soon(self._supervise, served)

    def _adopt_silent(self, name: str) -> None:
        """Watch a worker that serves *name* but answers no control socket (a volfs from
        before workers had one): it goes on serving, and `status` says it needs a remount."""
        try:
            pid = int((self.root.volume_path(name) / "lock").read_text().split()[0])
            worker = WorkerProcess(pid, child=False)
        except (OSError, ValueError, IndexError, ProcessLookupError):
            return
        staging = self.run_dir / "staging" / name
        entry = mounts.find_mount(staging)
        device = entry.device if entry is not None and entry.fstype == mounts.FSTYPE else ""
        served = Served(name, staging, worker=worker, device=device, adopted=True,
                        status="needs-remount")  # fmt: skip
        served.problems.append(
            f"its worker (pid {pid}) has no control socket (an older volfs?): unmount the "
            "volume and mount it again to update it"
        )
        self._adopt(served)
        log.warning("volume %s: adopted a worker that needs a remount (pid %d)", name, pid)

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
                        await self._mount(name, path, spec["read_only"], create=True)
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
        """Bring back the mounts made on request: adopt the ones still live, replace dead
        ones, and never create a directory or follow a symlink (this is a heal)."""
        async with self._admin:
            for name, path, read_only in self._remembered():
                try:
                    if name not in self.served and self.root.is_served(check_name(name)):
                        self._adopt_silent(name)
                    await self._mount(check_name(name), normalize(path), bool(read_only))
                except (VolfsError, TypeError) as exc:
                    # Kept (and shown by `status`): the mount point may come right again, and
                    # forgetting it would leave it bare for good.
                    log.error("volume %s: not mounted at %s again: %s", name, path, exc)
                    if isinstance(name, str) and isinstance(path, str):
                        staging = self.run_dir / "staging" / name
                        served = self.served.setdefault(name, Served(name, staging, status="down"))
                        mount_path = MountPath(Path(path), bool(read_only), REFUSED, str(exc))
                        served.paths.setdefault(Path(path), mount_path)

    # -- requests -----------------------------------------------------------------------------

    async def _accept(self, listener) -> None:
        while True:
            try:
                conn, _ = await listener.accept()
            except OSError as exc:  # out of file descriptors, say: wait, do not die
                log.error("cannot accept a connection: %s", exc)
                await trio.sleep(0.5)
                continue
            assert self._nursery is not None
            self._nursery.start_soon(self._serve_connection, conn)

    def _peer_allowed(self, conn) -> bool:
        return control.peer_uid(conn) in (0, os.geteuid())

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
                request = await workerctl.receive_frame(stream)
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
            where = self.root.log_path("volfsd.log")
            return {"ok": False, "error": f"internal error in volfsd; see its log ({where})"}

    def _describe(self, name: str) -> dict:
        served = self.served.get(name)
        if served is None:
            return describe(self.root, name)
        staging = served.staging if self._bind else None
        return describe(self.root, name, served.status, staging, served.read_only,
                        device=served.device or None)  # fmt: skip

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
            "daemon": {
                "pid": os.getpid(),
                "version": __version__,
                "uptime": round(time.time() - self._started, 1),
                "socket": str(self.run_dir / control.SOCKET_NAME),
                "store": str(self.root.path),
            },
            "volumes": [self.served[n].describe() for n in sorted(self.served)],
        }

    async def cmd_mount(
        self,
        name: str,
        mountpoint: str,
        read_only: bool = False,
        size: str | int = 0,
        inodes: str | int = 0,
    ):
        check_name(name)
        path = normalize(mountpoint)
        size_bytes = parse_size(size) if size else 0
        limit = parse_inodes(inodes) if inodes else 0
        async with self._admin:
            if self.root.exists(name):
                header = self.root.header(name)
                current = header.get("size", 0)
                if size_bytes and current != size_bytes:
                    raise VolfsError(
                        f"volume {name} exists with {_limit(current, 'size')}: mount it without "
                        f"--size, or change it with `volfsd resize {name} SIZE`"
                    )
                if limit and header.get("inodes", 0) != limit:
                    raise VolfsError(
                        f"volume {name} exists with {_limit(header.get('inodes', 0), 'inode')}: "
                        f"mount it without --inodes, or `volfsd resize {name} SIZE --inodes N`"
                    )
            else:
                self.root.create_volume(name, size=size_bytes, inodes=limit)
            await self._mount(name, path, read_only, create=True)
            self._remember(name, path, read_only, keep=True)
        return self._describe(name)

    async def cmd_umount(self, mountpoint: str, lazy: bool = False):
        path = normalize(mountpoint)
        async with self._admin:
            served = next((s for s in self.served.values() if path in s.paths), None)
            if served is None:
                raise VolfsError(f"{path} is not a volume mount of this daemon")
            last = len(served.paths) == 1
            if not lazy:
                self._refuse_if_in_use(served, path if not last else None)
            await self._unmount_path(served, path)
            self._remember(served.name, path, False, keep=False)
            if not last:
                return {"mountpoint": str(path)}
            self._detach_volume(served)
        if lazy:  # files may stay open on it: the worker serves them until they are closed
            assert self._nursery is not None
            self._nursery.start_soon(self._wait_stopped, served, math.inf)
        else:  # the worker ends once it has checkpointed; wait outside the lock for that
            await self._wait_stopped(served, STOP_GRACE)
        return {"mountpoint": str(path)}

    async def cmd_umount_all(self):
        """The full stop: every volume unmounted (lazily where busy), every worker ended."""
        started = time.monotonic()
        async with self._admin:
            leaving = list(self.served.values())
            for served in leaving:
                for path in list(served.paths):
                    try:
                        await self._unmount_path(served, path)
                    except VolfsError as exc:  # stop the others all the same
                        log.error("volume %s: %s", served.name, exc)
                    self._remember(served.name, path, False, keep=False)
                self._detach_volume(served)
            async with trio.open_nursery() as nursery:
                for served in leaving:
                    nursery.start_soon(self._wait_stopped, served, STOP_GRACE)
        return {"volumes": [s.name for s in leaving],
                "seconds": round(time.monotonic() - started, 2)}  # fmt: skip

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
                self._refuse_if_in_use(served, None)
                for path in list(served.paths):
                    await self._unmount_path(served, path)
                    self._remember(name, path, False, keep=False)
                self._detach_volume(served)
            if name in self.stopping:
                await self._wait_stopped(self.stopping[name], STOP_GRACE)
            if self.root.is_served(name):
                raise VolfsError(f"volume {name} is being served by another process")
            self.root.remove_volume(name)
        return {"name": name}

    async def cmd_resize(self, name: str, size: str | int, inodes: str | int = 0):
        """New limits: a mounted volume's through its worker (at once), else in the store."""
        check_name(name)
        size_bytes = parse_size(size)
        limit = parse_inodes(inodes) if inodes else None
        async with self._admin:
            if not self.root.exists(name):
                raise VolfsError(f"no such volume: {name}")
            served = self.served.get(name)
            if served is not None and served.worker is not None and served.worker.running:
                sock = workerctl.socket_path(self.run_dir, name)
                try:
                    await workerctl.call(sock, "set_limits", size=size_bytes, inodes=limit)
                except workerctl.WorkerUnreachable as exc:
                    raise VolfsError(
                        f"volume {name}: its worker could not be resized ({exc}); unmount the "
                        "volume and resize it then"
                    ) from None
            elif name in self.stopping or self.root.is_served(name):
                raise VolfsError(
                    f"volume {name} is served by another process or still unmounting: "
                    "try again once it is unmounted"
                )
            else:  # loading the volume (to know what it holds) may take seconds: not in the loop
                await trio.to_thread.run_sync(self.root.resize, name, size_bytes, limit)
        return self._describe(name)

    COMMANDS = {
        "create": cmd_create,
        "ls": cmd_ls,
        "inspect": cmd_inspect,
        "status": cmd_status,
        "mount": cmd_mount,
        "umount": cmd_umount,
        "umount_all": cmd_umount_all,
        "rm": cmd_rm,
        "resize": cmd_resize,
    }

    # -- mounting -------------------------------------------------------------------------------

    async def _mount(self, name: str, path: Path, read_only: bool, create: bool = False) -> None:
        """Serve *name* at *path*: start its worker if it has none, then bind *path*."""
        served = self.served.get(name)
        existing = served.paths.get(path) if served is not None else None
        if existing is not None and existing.read_only != read_only:
            mode = "read-only" if existing.read_only else "read-write"
            raise VolfsError(f"volume {name} is already mounted {mode} at {path}")
        if existing is not None and existing.state == MOUNTED:
            return  # asked again for what is there: nothing to do
        if served is not None and not self._bind and existing is None:
            raise VolfsError(
                f"volume {name} is already mounted at {next(iter(served.paths))}: a second "
                "mount point needs bind mounts, which need root"
            )
        mount_path = existing or MountPath(path, read_only)
        # The mount point is checked before a worker starts, so a bad one costs nothing.
        with open_mountpoint(path, create=create) as target:
            how = prepare(target, name, served.device if served is not None else "")
        if served is None or served.worker is None:
            served = await self._start_volume(name, path, served)
        if self._bind:
            served.bind_path(mount_path, create=False)
        else:
            mount_path.state = MOUNTED
        served.paths[path] = mount_path
        if how != PRESENT:
            log.info("volume %s mounted at %s%s", name, path, " (read-only)" if read_only else "")

    async def _start_volume(self, name: str, path: Path, served: Served | None) -> Served:
        """Start the worker of *name* (whose *served* record, if any, has none)."""
        leaving = self.stopping.get(name)
        if leaving is not None and leaving.worker is not None:
            with trio.move_on_after(STOP_GRACE):
                await leaving.worker.wait()
            if leaving.worker.running:
                raise VolfsError(
                    f"volume {name} is still being unmounted: files are open on a path "
                    "unmounted with --lazy; close them and try again"
                )
        if self.root.is_served(name):
            raise VolfsError(f"volume {name} is being served by another process (volfsd mount -f?)")
        if served is None:
            served = Served(name, self.run_dir / "staging" / name if self._bind else path)
        await self._start_worker(served)
        self.served[name] = served
        assert self._nursery is not None
        self._nursery.start_soon(self._supervise, served)
        return served

    async def _start_worker(self, served: Served) -> None:
        if self._bind:
            for directory in (served.staging.parent, served.staging):
                # Not Path.mkdir(exist_ok=True): its stat of a dead mount fails (ENOTCONN).
                with contextlib.suppress(FileExistsError):
                    os.mkdir(directory, 0o700)
            with open_mountpoint(served.staging) as staging:
                if staging.top() is not None:
                    sysmount.detach(staging.fd)  # left by a worker that died
        else:
            mounts.detach(served.staging, lazy=True)  # a dead mount of ours, if any
        log_name = f"{served.name}.log"
        ready_r, ready_w = os.pipe()
        args = [sys.executable, "-m", "volfs.worker", "--root", str(self.root.path),
                "--name", served.name, "--mountpoint", str(served.staging),
                "--ready-fd", str(ready_w), "--run-dir", str(self.run_dir)]  # fmt: skip
        try:
            with self.root.open_log(log_name) as log_file:
                process = WorkerProcess.spawn(args, log_file.fileno(), ready_w)
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
        if text.split(" ")[0] != "ok":
            process.send_signal(signal.SIGKILL)
            await process.wait()
            reason = text.removeprefix("error: ") or (
                f"the mount worker exited early; see {self.root.log_path(log_name)}"
            )
            raise VolfsError(reason)
        served.worker = process
        served.device = text.removeprefix("ok").strip()
        served.status = "mounted"
        served.adopted = False
        served.problems.clear()  # a failed restart or an old worker: behind us with this one

    async def _supervise(self, served: Served) -> None:
        """Wait for the worker to end; bring the volume back if nobody asked it to stop."""
        while True:
            assert served.worker is not None
            await served.worker.wait()
            if served.stopping:
                return
            code = served.worker.returncode
            log.error("volume %s: its worker exited (pid %d, %s); remounting at %s",
                      served.name, served.worker.pid, "status unknown" if code is None else code,
                      ", ".join(str(p) for p in served.paths))  # fmt: skip
            await self._heal(served)
            if served.stopping:
                return

    async def _heal(self, served: Served) -> None:
        """Start a new worker and put its mount at every path of the volume.

        The dead mounts stay on the paths meanwhile (writers get ENOTCONN, not the directory
        under the mount); each is replaced from beneath (served.py).
        """
        served.status = "healing"
        for mount_path in served.paths.values():
            if mount_path.state == MOUNTED:
                mount_path.state = DEAD
        if not self._bind:  # no way to replace a mount from beneath: detach, then mount
            for path in served.paths:
                mounts.detach(path, lazy=True)
        for delay in (*RESTART_DELAYS, *([RESTART_DELAYS[-1]] * 1000)):
            if served.stopping:
                return
            try:
                async with self._admin:
                    if served.stopping:
                        return
                    await self._start_worker(served)
                    for mount_path in served.paths.values():
                        if self._bind:
                            served.rebind(mount_path)
                        else:
                            mount_path.state = MOUNTED
                served.restarts += 1
                log.info("volume %s is back at %s", served.name,
                         ", ".join(str(p) for p, m in served.paths.items()
                                   if m.state == MOUNTED))  # fmt: skip
                return
            except (VolfsError, OSError) as exc:  # nothing here may take the daemon down
                served.status = "down"
                served.problems[:] = [f"restart failed: {exc}"]
                log.error(
                    "volume %s: restart failed: %s; retrying in %s s", served.name, exc, delay
                )
                await trio.sleep(delay)

    def _refuse_if_in_use(self, served: Served, path: Path | None) -> None:
        """Refuse to unmount *path* (None: the whole volume) while processes use it.

        One path of several: only files and directories opened through that bind count (the
        kernel cannot tell which bind another namespace's copy came from, and the volume stays
        for them anyway through its other paths).
        """
        if not served.device:
            return
        exclude = {os.getpid()} | ({served.worker.pid} if served.worker is not None else set())
        through = None
        if path is not None:
            try:
                with open_mountpoint(path) as target:
                    top = target.top()
            except VolfsError:
                return  # the mount point is gone or changed: nothing of ours is there to use
            if top is None or top.device != served.device:
                return
            through = {top.mount_id}
        found = users.users_of(served.device, exclude, through)
        if found:
            what = str(path) if path is not None else f"volume {served.name}"
            raise VolfsError(
                f"{what} is busy, in use by {users.describe_users(found)}: stop them, or use "
                "--lazy to detach now"
            )

    async def _unmount_path(self, served: Served, path: Path) -> None:
        """Detach *path* (lazily: open files stay usable until closed) if the mount there is
        still this volume's; forget the path either way."""
        mount_path = served.paths[path]
        try:
            if self._bind:
                with open_mountpoint(path) as target:
                    if served.owns(target):
                        sysmount.detach(target.fd)
                    elif mount_path.state != REFUSED:
                        log.warning("volume %s: %s was unmounted behind volfsd's back",
                                    served.name, path)  # fmt: skip
            else:
                entry = mounts.find_mount(path)
                if entry is None or entry.fstype != mounts.FSTYPE:
                    log.warning("volume %s: %s was unmounted behind volfsd's back",
                                served.name, path)  # fmt: skip
                else:
                    problem = await trio.to_thread.run_sync(mounts.detach, path, True)
                    if problem is not None:
                        raise VolfsError(f"cannot unmount {path}: {problem}")
        except VolfsError as exc:  # the mount point is gone or changed: nothing of ours there
            log.warning("volume %s: %s", served.name, exc)
        del served.paths[path]
        log.info("volume %s unmounted from %s", served.name, path)

    def _detach_volume(self, served: Served) -> None:
        """Detach the staging mount of a volume whose paths are gone, so that its worker ends.

        That ends the worker's FUSE session (at once, or once the last open file on a lazily
        detached path closes); the worker then checkpoints and exits by itself.
        `_wait_stopped` waits for the end.
        """
        served.stopping = True
        self.served.pop(served.name, None)
        self.stopping[served.name] = served
        if served.worker is None or not served.worker.running:
            return
        if self._bind:
            try:
                with open_mountpoint(served.staging) as staging:
                    if served.owns(staging):
                        sysmount.detach(staging.fd)
                        return
            except (VolfsError, OSError) as exc:
                log.warning("volume %s: staging mount: %s", served.name, exc)
        served.worker.send_signal(signal.SIGTERM)

    async def _wait_stopped(self, served: Served, grace: float) -> None:
        """Wait for the worker of a detached volume to end: *grace* s by itself, then
        `STOP_TIMEOUT` s after SIGTERM, then it is killed."""
        worker = served.worker
        if worker is not None and worker.running:
            with trio.move_on_after(grace):
                await worker.wait()
            if worker.running:
                worker.send_signal(signal.SIGTERM)
                with trio.move_on_after(STOP_TIMEOUT):
                    await worker.wait()
            if worker.running:
                log.error("volume %s: worker did not stop in time; killing it", served.name)
                worker.send_signal(signal.SIGKILL)
                await worker.wait()
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


def _limit(value: int, what: str) -> str:
    return f"{what} limit {value}" if value else f"no {what} limit"


def serve(config: Path | None) -> None:
    """Run the daemon in this process until SIGTERM or SIGINT."""
    from volfs.store.root import default_root

    root = StoreRoot(default_root())
    if config is None and DEFAULT_CONFIG.exists() and os.geteuid() == 0:
        config = DEFAULT_CONFIG
    if config is not None:
        load_config(config)  # refuse a bad config before taking anything
    trio.run(Daemon(root, control.default_run_dir(), config).run)
