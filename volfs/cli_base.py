"""What the command modules of ``volfsd`` share: the error, the parser, the daemon call, tables."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from volfs import control, requests
from volfs.catalog import LOCAL_ENGINE
from volfs.errors import ErrorCode, VolfsError
from volfs.store.root import StoreRoot, default_root


class CliError(VolfsError):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        raise CliError(f"{message} (see '{self.prog} --help')")


def store() -> StoreRoot:
    return StoreRoot(default_root())


def call(request: requests.DaemonRequest) -> Any:
    run_dir = control.default_run_dir()
    try:
        return control.call(run_dir, request)
    except VolfsError as exc:
        if exc.code != ErrorCode.INTERNAL:
            raise
        # Name the log the traceback went to: the daemon's stderr, found through /proc.
        raise CliError(
            f"internal error in volfsd; the traceback is in {control.daemon_log(run_dir)}",
            ErrorCode.INTERNAL,
        ) from None


# -- output ----------------------------------------------------------------------------------


def human_size(n: int) -> str:
    if not n:
        return "0"
    value = float(n)
    for unit in ("", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{value:.0f}{unit}" if unit == "" or value >= 10 else f"{value:.1f}{unit}"
        value /= 1024
    return str(value)


def print_table(rows: list[dict[str, Any]]) -> None:
    """`ls`'s table; with an ENGINE column when a row is not the local store's."""
    header = ["NAME", "SIZE", "USED", "MOUNTS", "STATUS", "CREATED"]
    table = [
        [
            r["name"],
            human_size(r["size"]) if r["size"] else "-",
            human_size(r["used"]),
            ",".join(f"{m} (ro)" if m in r.get("read_only", ()) else m for m in r["mounts"]) or "-",
            r["status"],
            r["created"],
        ]
        for r in rows
    ]
    engines = [r.get("engine", LOCAL_ENGINE) for r in rows]
    if any(e != LOCAL_ENGINE for e in engines):
        header.insert(1, "ENGINE")
        for row, engine in zip(table, engines, strict=True):
            row.insert(1, engine)
    print_rows(header, table)


def print_rows(header: list[str], rows: list[list[str]]) -> None:
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
