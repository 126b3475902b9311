"""``volfsd snapshot``, ``clone``, ``rollback``, ``export`` and ``import``, and the snapshot
table of ``ls --snapshots``.

Each asks the daemon if one runs (a mounted volume is snapshotted by its worker), else works on
the store directly (`volfs.store.history`), as `create` and `rm` do.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from volfs import control, requests
from volfs.catalog import LOCAL_ENGINE, describe, describe_snapshot, parse_labels, parse_size
from volfs.cli_base import CliError, Parser, call, human_size, print_rows, store
from volfs.config import DEFAULT_PATH, load_config
from volfs.engines import Engines
from volfs.errors import ErrorCode, VolfsError
from volfs.store import history
from volfs.store.headers import check_name
from volfs.store.root import default_root
from volfs.store.snapshots import check_target, parse_name


def cmd_snapshot(args: argparse.Namespace) -> None:
    name, snap = parse_name(args.snapshot)
    try:
        call(requests.SnapshotRequest(args.snapshot))
    except control.DaemonNotRunning:
        history.take_unserved(store(), name, snap)
    print(args.snapshot)


def cmd_clone(args: argparse.Namespace) -> None:
    name, snap = parse_name(args.snapshot)
    new = check_name(args.name)
    size = parse_size(args.size) if args.size is not None else None
    try:
        call(requests.CloneRequest(args.snapshot, new, size))
    except control.DaemonNotRunning:
        history.clone(store(), name, snap, new, size)
    print(new)


def cmd_rollback(args: argparse.Namespace) -> None:
    name, snap = parse_name(args.snapshot)
    try:
        call(requests.RollbackRequest(args.snapshot))
    except control.DaemonNotRunning:
        history.rollback(store(), name, snap)
    print(name)


def cmd_export(args: argparse.Namespace) -> None:
    """Export a volume at rest, a snapshot, or a mounted volume through a snapshot of it."""
    from volfs import export  # tqdm and the archive writer: only for this command

    path = Path(args.output) if args.output else None
    name = check_target(args.name)
    if "@" in name or not store().is_served(name):
        export.export(default_root(), name, path)
        return
    # Mounted: one instant of it, from a snapshot taken for the export and removed after.
    label = f"{name}@export-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    try:
        call(requests.SnapshotRequest(label))
    except control.DaemonNotRunning:
        raise CliError(
            f"volume {name} is mounted by a process without the daemon (volfsd mount -f): "
            "unmount it to export it, or mount it through the daemon, which exports a "
            "snapshot of it",
            ErrorCode.BUSY,
        ) from None
    try:
        export.export(default_root(), label, path)
    finally:
        try:
            call(requests.RmRequest(label))
        except (VolfsError, OSError) as exc:
            print(f"volfsd: the export's snapshot {label} is left ({exc}): remove it with "
                  f"'volfsd rm {label}'", file=sys.stderr)  # fmt: skip


def cmd_import(args: argparse.Namespace) -> None:
    from volfs import importer

    labels = parse_labels(args.label)
    if args.engine in (None, LOCAL_ENGINE):
        importer.import_volume(default_root(), args.name, args.source, args.size, labels)
    else:
        if labels:
            raise CliError("volumes of a cluster engine take no labels yet: leave out --label")
        name = check_name(args.name)
        url = _engine_url(args.engine, args.config)
        Engines(store(), {}).check_free(name, args.engine)  # the local store's names
        importer.import_to_engine(url, args.engine, name, args.source, args.size)
    print(args.name)


def _engine_url(engine: str, config_path: str | None) -> str:
    """The URL of cluster engine *engine*, from the daemon's config file."""
    path = Path(config_path) if config_path else DEFAULT_PATH
    found = load_config(path).engines.get(check_name(engine))
    if found is None:
        raise CliError(f"no engine {engine} in {path}: add an [engines.{engine}] table with its "
                       "url, or give --config", ErrorCode.NOT_FOUND)  # fmt: skip
    return found.url


def snapshot_rows() -> list[dict[str, Any]]:
    """Every snapshot of the store, as the daemon or the store describes them."""
    try:
        return list(call(requests.LsRequest(snapshots=True)))
    except control.DaemonNotRunning:
        root = store()
        return [describe_snapshot(root, label) for label in history.labels(root)]


def describe_target(name: str) -> dict[str, Any]:
    """What `inspect` shows of volume or snapshot *name* without a daemon."""
    root = store()
    if "@" in name:
        history.check_exists(root, name)
        return describe_snapshot(root, name)
    return describe(root, name)


def print_snapshots(rows: list[dict[str, Any]]) -> None:
    header = ["NAME", "CREATED", "USED", "HELD", "MOUNTS"]
    table = [
        [r["name"], r.get("created", "-"), human_size(r.get("used", 0)),
         human_size(r.get("held", 0)), ",".join(r.get("mounts", ())) or "-"]
        for r in rows
    ]  # fmt: skip
    print_rows(header, table)


def add_parsers(sub: argparse._SubParsersAction[Parser]) -> None:
    snapshot = sub.add_parser("snapshot", help="snapshot a volume now, mounted or not")
    snapshot.add_argument("snapshot", metavar="NAME@SNAP")
    snapshot.set_defaults(func=cmd_snapshot)

    clone = sub.add_parser("clone", help="a new writable volume from a snapshot")
    clone.add_argument("snapshot", metavar="NAME@SNAP")
    clone.add_argument("name", metavar="NEW")
    clone.add_argument("--size", help="its size (default: the origin's); not below the snapshot")
    clone.set_defaults(func=cmd_clone)

    rollback = sub.add_parser("rollback", help="return an unmounted volume to a snapshot")
    rollback.add_argument("snapshot", metavar="NAME@SNAP")
    rollback.set_defaults(func=cmd_rollback)


def add_backup_parsers(sub: argparse._SubParsersAction[Parser]) -> None:
    """``export`` and ``import``."""
    exports = sub.add_parser("export", help="write a volume or snapshot (NAME@SNAP) as a pax tar")
    exports.add_argument("name", metavar="NAME")
    exports.add_argument("-o", "--output", metavar="FILE", help="write FILE (default: stdout)")
    exports.set_defaults(func=cmd_export)

    imports = sub.add_parser("import", help="a new volume from a tar (FILE, - for stdin) or DIR")
    imports.add_argument("name", metavar="NAME")
    imports.add_argument("source", metavar="FILE|-|DIR")
    imports.add_argument("--size", help="most data it may hold (default: the archive's)")
    imports.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    imports.add_argument("--engine", metavar="ENGINE",
                         help="where the new volume lives: local (the default) or an "
                         "[engines.NAME] of the config")  # fmt: skip
    imports.add_argument(
        "--config", metavar="PATH", help=f"the config that names --engine (default {DEFAULT_PATH})"
    )
    imports.set_defaults(func=cmd_import)
