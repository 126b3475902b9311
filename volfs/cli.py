"""``volfsd``: the command line.  Every failure is one line on stderr and exit status 1."""

from __future__ import annotations

import argparse
import errno
import fcntl
import logging
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from volfs import mounts
from volfs.errors import VolfsError
from volfs.store.root import StoreRoot, check_name, default_root

#: How long `mount` waits for the worker to report the mount live.
MOUNT_TIMEOUT = 60.0
#: How long `umount` waits for the worker to flush, checkpoint and let go of the volume.
UMOUNT_TIMEOUT = 120.0


class CliError(VolfsError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise CliError(f"{message} (see '{self.prog} --help')")


def _mountpoint(text: str) -> Path:
    if "\0" in text:
        raise CliError("mount point contains a NUL byte")
    path = Path(text)
    if not path.is_absolute():
        raise CliError(f"mount point {text!r} is relative: give an absolute path")
    return Path(os.path.normpath(path))


def _prepare_mountpoint(path: Path) -> None:
    _clear_dead_mount(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise CliError(f"mount point {path} exists and is not a directory") from None
    except OSError as exc:
        raise CliError(f"cannot create mount point {path}: {exc.strerror}") from None
    entry = mounts.find_mount(path)
    if entry is not None:
        raise CliError(f"{path} is already a mount point ({entry.fstype} {entry.source})")
    try:
        if any(path.iterdir()):
            raise CliError(f"mount point {path} is not empty: use an empty directory")
    except PermissionError:
        raise CliError(f"cannot read mount point {path}: permission denied") from None


def _clear_dead_mount(path: Path) -> None:
    """Detach a volfs mount whose server died ("Transport endpoint is not connected")."""
    entry = mounts.find_mount(path)
    if entry is None or entry.fstype != mounts.FSTYPE:
        return
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            logging.getLogger(__name__).warning(
                "clearing the dead mount of %s at %s", entry.source, path
            )
            mounts.detach(path, lazy=True)


def _log_path(root: Path, name: str) -> Path:
    logs = root / "logs"
    logs.mkdir(mode=0o700, exist_ok=True)
    return logs / f"{name}.log"


def cmd_mount(args: argparse.Namespace) -> None:
    name = check_name(args.name)
    mountpoint = _mountpoint(args.mountpoint)
    root = StoreRoot(default_root())
    _prepare_mountpoint(mountpoint)
    worker_args = ["--root", str(root.path), "--name", name, "--mountpoint", str(mountpoint)]
    if args.ro:
        worker_args.append("--read-only")
    if args.foreground:
        from volfs import worker  # the FUSE machinery loads only where it is needed

        if worker.main(worker_args) != 0:
            raise CliError(f"volume {name} could not be served at {mountpoint}: see the log above")
        return
    ready_r, ready_w = os.pipe()
    log_path = _log_path(root.path, name)
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "volfs.worker", *worker_args, "--ready-fd", str(ready_w)],
            pass_fds=(ready_w,),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
        )
    os.close(ready_w)
    reply = _read_ready(ready_r, proc)
    if reply != "ok":
        if proc.poll() is None:
            proc.kill()
        raise CliError(reply or f"the mount worker exited early; see {log_path}")


def _read_ready(fd: int, proc: subprocess.Popen) -> str:
    deadline = time.monotonic() + MOUNT_TIMEOUT
    data = b""
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while time.monotonic() < deadline:
            readable, _, _ = select.select([pipe], [], [], 0.5)
            if readable:
                chunk = pipe.read(4096)
                if not chunk:
                    break
                data += chunk
                if data.endswith(b"\n"):
                    break
            elif proc.poll() is not None:
                break
        else:
            return f"the mount worker did not report within {MOUNT_TIMEOUT:.0f} s"
    text = data.decode(errors="replace").strip()
    return text.removeprefix("error: ")


def cmd_umount(args: argparse.Namespace) -> None:
    mountpoint = _mountpoint(args.mountpoint)
    entry = mounts.find_mount(mountpoint)
    if entry is None or entry.fstype != mounts.FSTYPE:
        raise CliError(f"{mountpoint} is not a volfs mount")
    problem = mounts.detach(mountpoint, lazy=args.lazy)
    if problem is not None:
        if "busy" in problem.lower():
            raise CliError(
                f"{mountpoint} is busy: stop the processes using it, or use --lazy to detach now"
            )
        raise CliError(f"cannot unmount {mountpoint}: {problem}")
    _wait_released(default_root(), entry.source)


def _wait_released(root: Path, name: str) -> None:
    """Wait until the worker has flushed and let go of volume *name* (if it lives in *root*)."""
    try:
        fd = os.open(root / "volumes" / name / "lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return  # served from another store root: nothing here to wait for
    try:
        deadline = time.monotonic() + UMOUNT_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
            if time.monotonic() > deadline:
                raise CliError(f"volume {name} was detached but its worker is still flushing")
            time.sleep(0.05)
    finally:
        os.close(fd)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="volfsd", description="Named, persistent, shared volumes over FUSE.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    mount = sub.add_parser("mount", help="mount volume NAME at MOUNTPOINT, creating it if new")
    mount.add_argument("name", metavar="NAME")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT")
    mount.add_argument("--ro", action="store_true", help="mount read-only")
    mount.add_argument("-f", "--foreground", action="store_true", help="serve in the foreground")
    mount.set_defaults(func=cmd_mount)
    umount = sub.add_parser("umount", help="flush and detach the volume mounted at MOUNTPOINT")
    umount.add_argument("mountpoint", metavar="MOUNTPOINT")
    umount.add_argument("--lazy", action="store_true", help="detach even if files are open")
    umount.set_defaults(func=cmd_umount)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="volfsd: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except VolfsError as exc:
        print(f"volfsd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"volfsd: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    return 0
