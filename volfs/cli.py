"""``volfsd``: the command line.  Every failure is one line on stderr and exit status 1;
fsck and scrub exit 0 clean, 1 damage found, 2 not checked (so their failures exit 2).

Commands talk to the daemon over its control socket.  `mount` starts the daemon in the
background if none is running; commands that only read or change the store (`ls`, `inspect`,
`create`, `rm`) also work without one.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import volfs
from volfs import checking, cli_history, cli_stats, control, logs, mounts, pyfuse3_build, requests
from volfs.catalog import (
    LOCAL_ENGINE,
    describe,
    parse_gid,
    parse_inodes,
    parse_labels,
    parse_mode,
    parse_size,
    parse_uid,
)
from volfs.cli_base import CliError, Parser, call, human_size, print_rows, print_table, store
from volfs.config import DEFAULT_PATH, parse_metrics_address, parse_plugin_name
from volfs.errors import ErrorCode, VolfsError
from volfs.mountpoint import REPLACE, normalize, open_mountpoint, prepare
from volfs.store import history, pidlock
from volfs.store.headers import check_name
from volfs.store.root import StoreRoot, default_root, open_log
from volfs.store.snapshots import check_target, parse_name
from volfs.users import describe_users, users_of

#: How long `mount` waits for a daemon it started to listen.
DAEMON_START_TIMEOUT = 30.0
#: How long `umount` waits for a worker it detached directly to let go of the volume.
UMOUNT_TIMEOUT = 120.0
#: Where the CLI writes the traceback of an internal error, in the store root's logs/.  Volume
#: names start with a letter or digit, so no volume's worker log can be this file.
CLI_LOG = "_cli.log"
#: Commands whose exit status 1 means "damage found": their failures exit 2 ("not checked").
CHECKS = {"fsck": checking.UNCHECKED, "scrub": checking.UNCHECKED}


def _start_daemon(root: StoreRoot) -> None:
    """Start `volfsd serve` in the background and wait until it answers."""
    with root.open_log("volfsd.log") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "volfs", "serve"],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
        )
    deadline = time.monotonic() + DAEMON_START_TIMEOUT
    pid_file = control.default_run_dir() / control.PID_FILE
    while time.monotonic() < deadline:
        try:
            call(requests.StatusRequest())
            return
        except control.DaemonNotRunning:
            # Ours exited while another daemon holds the run dir: we lost a race with another
            # starter, and that one will answer.
            if proc.poll() is not None and not pidlock.is_held(pid_file):
                lines = root.log_path("volfsd.log").read_text(errors="replace").strip().splitlines()
                last = lines[-1].split(": ", 1)[-1] if lines else "no output"
                raise CliError(f"the daemon failed to start: {last}") from None
            time.sleep(0.05)
    raise CliError(f"the daemon did not start within {DAEMON_START_TIMEOUT:.0f} s")


# -- commands --------------------------------------------------------------------------------


def cmd_create(args: argparse.Namespace) -> None:
    labels = parse_labels(args.label)
    size = parse_size(args.size) if args.size is not None else 0
    inodes = _inodes(args)
    # None where not given: so a request leaves it out, and an older daemon still takes it.
    uid = None if args.uid is None else parse_uid(args.uid)
    gid = None if args.gid is None else parse_gid(args.gid)
    mode = None if args.mode is None else parse_mode(args.mode)
    engine = None if args.engine in (None, LOCAL_ENGINE) else check_name(args.engine)
    request = requests.CreateRequest(check_name(args.name), size, labels, inodes, uid, gid, mode,
                                     engine)  # fmt: skip
    try:
        call(request)
    except control.DaemonNotRunning:
        if engine is not None:  # only the daemon knows the engines (its config)
            _start_daemon(store())
            call(request)
            print(args.name)
            return
        root = store()
        root.create_volume(args.name, size, labels, inodes=inodes, uid=uid, gid=gid, mode=mode)
        describe(root, args.name)
    print(args.name)


def _inodes(args: argparse.Namespace) -> int:
    """The ``--inodes`` limit, 0 if not given (a request leaves it out then)."""
    return 0 if args.inodes is None else parse_inodes(args.inodes)


def _volumes(names: list[str] | None) -> list[dict[str, Any]]:
    try:
        if names is None:
            return list(call(requests.LsRequest()))
        return list(call(requests.InspectRequest(names)))
    except control.DaemonNotRunning:
        root = store()
        if names is None:
            names = root.names()
        for name in names:
            if "@" not in name and not root.exists(check_name(name)):
                raise CliError(f"no such volume: {name}", ErrorCode.NOT_FOUND) from None
        return [cli_history.describe_target(name) for name in names]


def cmd_ls(args: argparse.Namespace) -> None:
    rows = cli_history.snapshot_rows() if args.snapshots else _volumes(None)
    if args.quiet:
        for row in rows:
            print(row["name"])
    elif args.format == "json":
        for row in rows:
            print(json.dumps(row, sort_keys=True))
    elif args.snapshots:
        cli_history.print_snapshots(rows)
    else:
        print_table(rows)


def cmd_inspect(args: argparse.Namespace) -> None:
    print(json.dumps(_volumes(args.names), indent=2, sort_keys=True))


def cmd_status(args: argparse.Namespace) -> None:
    try:
        status = call(requests.StatusRequest())
    except control.DaemonNotRunning as exc:
        raise CliError(f"volfsd is not running ({exc})") from None
    if args.format == "json":
        print(json.dumps(status, indent=2, sort_keys=True))
        return
    daemon = status["daemon"]
    print(f"volfsd {daemon['version']}, pid {daemon['pid']}, up {daemon['uptime']:.0f} s, "
          f"store {daemon['store']}")  # fmt: skip
    rows = []
    for volume in status["volumes"]:
        worker = volume["worker_pid"]
        paths = [
            m["path"] + (" (ro)" if m["read_only"] else "")
            + ("" if m["state"] == "mounted" else f" [{m['state'].split(':')[0]}]")
            for m in volume["mounts"]
        ]  # fmt: skip
        rows.append([volume["name"], volume["status"], str(worker or "-"),
                     str(volume["restarts"]), "yes" if volume["adopted"] else "no",
                     _scrubbed(volume.get("last_scrub")), _ratio(volume.get("garbage_ratio")),
                     ", ".join(paths) or "-"])  # fmt: skip
    print_rows(["VOLUME", "STATUS", "WORKER", "RESTARTS", "ADOPTED", "SCRUBBED", "GARBAGE",
                "MOUNTS"], rows)  # fmt: skip
    free = next((v["disk_free"] for v in status["volumes"] if "disk_free" in v), None)
    if free is not None:
        print(f"free on the store's disk: {human_size(free)}")
    for volume in status["volumes"]:
        for problem in volume["problems"]:
            print(f"{volume['name']}: {problem}")
    for engine, state in sorted(status.get("engines", {}).items()):
        print(f"engine {engine}: {'reachable' if state == 'ok' else state}")


def _scrubbed(scrub: dict[str, Any] | None) -> str:
    if not scrub:
        return "never"
    found = f", {scrub['problems']} problem(s)" if scrub.get("problems") else ", clean"
    return f"{scrub.get('at', '?')}{found}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def cmd_mount(args: argparse.Namespace) -> None:
    name = check_target(args.name)
    mountpoint = normalize(args.mountpoint)
    size = parse_size(args.size) if args.size is not None else 0
    inodes = _inodes(args)
    root = store()
    if args.log_format is not None and not args.foreground:
        raise CliError(
            "--log-format goes with mount -f; the daemon's workers log as `volfsd serve "
            "--log-format` (or log_format in its config) says"
        )
    if args.foreground:
        _mount_foreground(root, name, mountpoint, args.ro, size, inodes, args.log_format)
        return
    mount_through_daemon(requests.MountRequest(name, mountpoint, args.ro, size, inodes))


def mount_through_daemon(request: requests.MountRequest) -> None:
    """Ask the daemon for *request*, starting it first if none runs; return once the mount
    is there (`volfsd mount`, and mount(8) through mount_helper.py)."""
    try:
        call(request)
    except control.DaemonNotRunning:
        _start_daemon(store())
        call(request)


def _mount_foreground(
    root: StoreRoot,
    name: str,
    mountpoint: Path,
    read_only: bool,
    size: int,
    inodes: int = 0,
    log_format: str | None = None,
) -> None:
    """Serve one volume in this process, without the daemon (debugging, simple units)."""
    from volfs import worker  # the FUSE machinery loads only where it is needed

    if "@" in name:  # a snapshot: read-only, never created (the worker checks it exists)
        history.check_exists(root, name)
    elif not root.exists(name):
        root.create_volume(name, size, inodes=inodes)
    if root.is_served(name):
        raise CliError(
            f"volume {name} is already being served (pid {root.lock_holder(name)})",
            ErrorCode.ALREADY_SERVED,
        )
    with open_mountpoint(mountpoint, create=True) as target:
        if prepare(target, name) == REPLACE:
            mounts.detach(mountpoint, lazy=True)  # a dead mount of this volume
    worker_args = ["--root", str(root.path), "--name", name, "--mountpoint", str(mountpoint)]
    if read_only:
        worker_args.append("--read-only")
    worker_args += ["--log-format", log_format or "text"]
    if logs.stderr_is_journal():
        worker_args.append("--journal")
    if worker.main(worker_args) != 0:
        raise CliError(f"volume {name} could not be served at {mountpoint}: see the log above")


def cmd_umount(args: argparse.Namespace) -> None:
    if args.all:
        if args.mountpoint is not None:
            raise CliError("give a mount point or --all, not both")
        _umount_all()
        return
    if args.mountpoint is None:
        raise CliError("give the mount point to unmount, or --all")
    mountpoint = normalize(args.mountpoint)
    entry = mounts.find_mount(mountpoint)
    try:  # the daemon also lets go of a path of its that was unmounted behind its back
        call(requests.UmountRequest(mountpoint, args.lazy))
        return
    except control.DaemonNotRunning:
        pass
    except VolfsError as exc:
        if exc.code != ErrorCode.NOT_MOUNTED:
            raise
    if entry is None or entry.fstype != mounts.FSTYPE:
        raise CliError(f"{mountpoint} is not a volfs mount")
    _check_foreground_mount(mountpoint, entry)
    # Served outside the daemon (volfsd mount -f): detach it and wait for its worker.
    problem = mounts.detach(mountpoint, lazy=args.lazy)
    if problem is not None:
        if problem.code == ErrorCode.BUSY:
            who = describe_users(users_of(entry.device))
            raise CliError(
                f"{mountpoint} is busy{f' (used by {who})' if who else ''}: stop the processes "
                "using it, or use --lazy to detach now",
                ErrorCode.BUSY,
            )
        raise CliError(f"cannot unmount {mountpoint}: {problem}", problem.code)
    _wait_released(default_root(), entry.source)


def _check_foreground_mount(mountpoint: Path, entry: mounts.MountEntry) -> None:
    """Refuse to detach *mountpoint* by hand unless it is a `mount -f` mount of our store.

    Anything else belongs to a daemon (its staging mount, or a bind of it that some other
    daemon serves): detaching it behind that daemon's back would leave it binding a bare
    directory, or take a volume from another store's users.
    """
    if mountpoint.is_relative_to(control.default_run_dir()):
        raise CliError(
            f"{mountpoint} is the daemon's own staging mount: unmount the volume's paths instead"
        )
    root = store()
    name = entry.source
    ours = root.exists(name) and root.is_served(name) and root.served_device(name) == entry.device
    if not ours:
        raise CliError(
            f"{mountpoint} is volume {name} of another store or daemon: unmount it with the "
            "volfsd that serves it (its VOLFS_ROOT and VOLFS_RUN_DIR)"
        )
    staging = f"/staging/{name}"
    staged = [
        e.mountpoint
        for e in mounts.volfs_mounts()
        if e.device == entry.device and e.mountpoint.endswith(staging)
    ]
    if staged:
        raise CliError(
            f"{mountpoint} is served by another volfsd daemon (staging mount {staged[0]}): "
            "unmount it through that daemon (set VOLFS_RUN_DIR to its runtime dir)"
        )


def _umount_all() -> None:
    try:
        done = call(requests.UmountAllRequest())
    except control.DaemonNotRunning:
        # Workers outlive their daemon: one started now adopts them, then stops them.
        _start_daemon(store())
        done = call(requests.UmountAllRequest())
    assert isinstance(done, dict)
    print(f"unmounted {len(done['volumes'])} volume(s) in {done['seconds']:.1f} s")


def _wait_released(root: Path, name: str) -> None:
    """Wait until the worker has flushed and let go of volume *name* (if it lives in *root*)."""
    deadline = time.monotonic() + UMOUNT_TIMEOUT
    while pidlock.is_held(root / "volumes" / name / "lock"):
        if time.monotonic() > deadline:
            raise CliError(f"volume {name} was detached but its worker is still flushing")
        time.sleep(0.05)


def cmd_rm(args: argparse.Namespace) -> None:
    for name in args.names:
        check_target(name)
        try:
            call(requests.RmRequest(name, args.force, args.recursive))
        except control.DaemonNotRunning:
            root = store()
            if "@" in name:
                history.remove(root, *parse_name(name))
                print(name)
                continue
            if not root.exists(name):
                raise CliError(f"no such volume: {name}", ErrorCode.NOT_FOUND) from None
            if root.is_served(name):
                raise CliError(
                    f"volume {name} is mounted: unmount it first", ErrorCode.BUSY
                ) from None
            root.remove_volume(name, args.recursive)
        print(name)


def cmd_resize(args: argparse.Namespace) -> None:
    """A new size (and inode limit) for an unmounted volume; never below what it holds."""
    name = check_name(args.name)
    size = parse_size(args.size)
    inodes = _inodes(args) or None  # None: keep the inode limit it has
    try:
        call(requests.ResizeRequest(name, size, inodes))
    except control.DaemonNotRunning:
        root = store()
        if not root.exists(name):
            raise CliError(f"no such volume: {name}", ErrorCode.NOT_FOUND) from None
        root.resize(name, size, inodes)
    print(name)


def cmd_fsck(args: argparse.Namespace) -> int:
    return checking.fsck(default_root(), args.name, args.repair)


def cmd_scrub(args: argparse.Namespace) -> int:
    return checking.scrub(default_root(), args.name, args.rate)


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = -1.0
    if not rate >= 0:
        raise argparse.ArgumentTypeError(f"invalid rate {text!r}: MB/s, or 0 for no limit")
    return rate


def cmd_serve(args: argparse.Namespace) -> None:
    from volfs import daemon

    daemon.serve(
        Path(args.config) if args.config else None,
        args.docker_plugin,
        args.metrics,
        args.log_format,
    )


def _add_removal_parsers(sub: argparse._SubParsersAction[Parser]) -> None:
    """``rm``, ``resize``, and the history's (``snapshot``, ``clone``, ``rollback``)."""
    rm = sub.add_parser("rm", help="destroy volumes and their data")
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.add_argument("-f", "--force", action="store_true", help="unmount first if mounted")
    rm.add_argument("-r", "--recursive", action="store_true", help="remove its snapshots too")
    rm.set_defaults(func=cmd_rm)
    cli_history.add_parsers(sub)

    resize = sub.add_parser("resize", help="give an unmounted volume a new size")
    resize.add_argument("name", metavar="NAME")
    resize.add_argument("size", metavar="SIZE", help="512M, 10G, 1T; not below what it holds")
    resize.add_argument("--inodes", metavar="N", help="a new inode limit")
    resize.set_defaults(func=cmd_resize)


def _add_watch_parsers(sub: argparse._SubParsersAction[Parser]) -> None:
    """``status`` and ``stats``."""
    status = sub.add_parser("status", help="show the daemon's state")
    status.add_argument("--format", choices=["table", "json"], default="table")
    status.set_defaults(func=cmd_status)
    cli_stats.add_parser(sub)


def _add_log_format(parser: argparse.ArgumentParser, when: str = "") -> None:
    parser.add_argument("--log-format", choices=logs.FORMATS, default=None,
                        help=f"{when}log lines as text (default) or one JSON object each; "
                        "under systemd the journal takes them")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="volfsd", description="Named, persistent, shared volumes over FUSE.")
    version = f"volfsd {volfs.__version__}, {pyfuse3_build.describe()}"
    parser.add_argument("--version", action="version", version=version)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    create = sub.add_parser("create", help="create volume NAME (no-op if it exists alike)")
    create.add_argument("name", metavar="NAME")
    create.add_argument("--size", help="most data it may hold: 512M, 10G, 1T")
    create.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    create.add_argument("--inodes", metavar="N", help="most files, directories and so on")
    create.add_argument("--uid", metavar="UID", help="owner of its root directory (a number)")
    create.add_argument("--gid", metavar="GID", help="group of its root directory (a number)")
    create.add_argument("--mode", metavar="MODE", help="mode of its root directory: 0755, 2775")
    create.add_argument("--engine", metavar="ENGINE",
                        help="where it lives: local (the default) or an [engines.NAME] of the "
                        "daemon's config")  # fmt: skip
    create.set_defaults(func=cmd_create)

    ls = sub.add_parser("ls", help="list volumes")
    ls.add_argument("-q", "--quiet", action="store_true", help="names only")
    ls.add_argument("--format", choices=["table", "json"], default="table")
    ls.add_argument("--snapshots", action="store_true", help="list snapshots (NAME@SNAP)")
    ls.set_defaults(func=cmd_ls)

    inspect = sub.add_parser("inspect", help="show volumes as a JSON array")
    inspect.add_argument("names", nargs="+", metavar="NAME")
    inspect.set_defaults(func=cmd_inspect)

    mount = sub.add_parser("mount", help="mount volume NAME at MOUNTPOINT, creating it if new")
    mount.add_argument("name", metavar="NAME")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT")
    mount.add_argument("--ro", action="store_true", help="mount read-only")
    mount.add_argument("--size", help="size of a volume created now: 512M, 10G, 1T")
    mount.add_argument("--inodes", metavar="N", help="inode limit of a volume created now")
    mount.add_argument(
        "-f", "--foreground", action="store_true", help="serve in this process, without the daemon"
    )
    _add_log_format(mount, "with -f: ")
    mount.set_defaults(func=cmd_mount)

    umount = sub.add_parser("umount", help="unmount MOUNTPOINT; the data stays")
    umount.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")
    umount.add_argument("--lazy", action="store_true", help="detach even if files are in use")
    umount.add_argument(
        "--all", action="store_true", help="unmount every volume and stop every worker"
    )
    umount.set_defaults(func=cmd_umount)

    _add_removal_parsers(sub)

    fsck = sub.add_parser(
        "fsck", help="check an unmounted volume (and its snapshots), or NAME@SNAP"
    )
    fsck.add_argument("name", metavar="NAME")
    fsck.add_argument("--repair", action="store_true", help="fix what needs no guessing")
    fsck.set_defaults(func=cmd_fsck)

    scrubs = sub.add_parser("scrub", help="verify every checksum of a volume, mounted or not")
    scrubs.add_argument("name", metavar="NAME")
    scrubs.add_argument("--rate", type=_rate, default=checking.DEFAULT_RATE, metavar="MB/s",
                        help="read at most this fast (default 50; 0: no limit)")  # fmt: skip
    scrubs.set_defaults(func=cmd_scrub)

    cli_history.add_backup_parsers(sub)

    _add_watch_parsers(sub)

    serve = sub.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument("--config", help=f"volumes to mount (default {DEFAULT_PATH})")
    serve.add_argument("--docker-plugin", metavar="NAME", type=parse_plugin_name,
                       help="serve Docker volume driver NAME (root: volfs), or off")  # fmt: skip
    serve.add_argument("--metrics", metavar="HOST:PORT", type=parse_metrics_address,
                       help="serve metrics there (root: 127.0.0.1:9567), or off")  # fmt: skip
    _add_log_format(serve)
    serve.set_defaults(func=cmd_serve)
    return parser


def _error_status(argv: list[str]) -> int:
    """The exit status of a failure of the command *argv* names (also when it did not parse)."""
    command = next((a for a in argv if not a.startswith("-")), "")
    return CHECKS.get(command, 1)


def _log_internal_error(argv: list[str]) -> str | None:
    """Append the traceback of the exception being handled to the store's CLI log; its path."""
    root = default_root()
    if not root.is_dir():  # no store to log into, and creating one for this would be wrong
        return None
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    text = f"{stamp} volfsd {' '.join(argv)}: internal error\n{traceback.format_exc()}"
    try:
        with open_log(root, CLI_LOG) as log_file:
            log_file.write(text.encode(errors="replace"))
    except (OSError, VolfsError):
        return None
    return str(root / "logs" / CLI_LOG)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s volfsd[%(process)d] %(levelname)s %(message)s"
    )
    argv = sys.argv[1:] if argv is None else argv
    failed = _error_status(argv)
    try:
        args = build_parser().parse_args(argv)
        status = args.func(args)  # fsck and scrub return theirs; the others None when done
    except VolfsError as exc:
        print(f"volfsd: {exc}", file=sys.stderr)
        return failed
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"volfsd: {exc.strerror or exc}{where}", file=sys.stderr)
        return failed
    except Exception as exc:  # a bug: one line that says where the whole story is
        what = (str(exc).splitlines() or [""])[0][:200]
        summary = f"{type(exc).__name__}: {what}" if what else type(exc).__name__
        logged = _log_internal_error(argv)
        if logged is None:
            print(f"volfsd: internal error ({summary}); traceback:", file=sys.stderr)
            traceback.print_exc()
        else:
            print(
                f"volfsd: internal error ({summary}); the traceback is in {logged}", file=sys.stderr
            )
        return failed
    return status or 0
