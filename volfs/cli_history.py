"""``volfsd snapshot``, ``clone`` and ``rollback``, and the snapshot table of ``ls --snapshots``.

Each asks the daemon if one runs (a mounted volume is snapshotted by its worker), else works on
the store directly (`volfs.store.history`), as `create` and `rm` do.
"""

from __future__ import annotations

import argparse
from typing import Any

from volfs import control, requests
from volfs.catalog import describe, describe_snapshot, parse_size
from volfs.cli_base import Parser, call, human_size, print_rows, store
from volfs.store import history
from volfs.store.headers import check_name
from volfs.store.snapshots import parse_name


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


def snapshot_rows() -> list[dict[str, Any]]:
    """Every snapshot of the store, as the daemon or the store describes them."""
    try:
        return list(call(requests.LsRequest(snapshots=True)))
    except control.DaemonNotRunning:
        root = store()
        labels = [row["name"] for name in root.names() for row in history.describe(root, name)]
        return [describe_snapshot(root, label) for label in labels]


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
