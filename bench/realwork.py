"""The real-work group of bench/run.py: what users run on a volume, with real tools.

A source tree made at run time (a tarball of Python library directories, __pycache__ left
out) is untarred with GNU tar, added and committed with git, read back with tar and walked
with find after a remount and a drop of the page cache, and removed with rm -rf; SQLite runs
one-row transactions with synchronous=FULL in WAL and rollback-journal mode. Each workload
times only its tool's run; the table shows a speed (higher is better), so the ratio to
native is a speed ratio. On volfs, each sample also carries the FUSE requests per operation
(`requestcount`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import requestcount
import workloads
from targets import Target, Unsupported

WORKLOADS = (
    "untar",
    "git_add_commit",
    "tar_read_cold",
    "find_stat_cold",
    "sqlite_1row_wal",
    "sqlite_1row_rollback",
    "rm_rf",
)
UNITS = {
    "untar": "files/s",
    "git_add_commit": "files/s",
    "tar_read_cold": "MB/s",
    "find_stat_cold": "entries/s",
    "sqlite_1row_wal": "txn/s",
    "sqlite_1row_rollback": "txn/s",
    "rm_rf": "entries/s",
}
#: The workloads that need the untarred tree: untar runs (untimed if not wanted) for them.
TREE_WORKLOADS = {"untar", "git_add_commit", "tar_read_cold", "find_stat_cold", "rm_rf"}
DEFAULT_SOURCES = ("/usr/lib/python3.11", "/usr/lib/python3/dist-packages")
SMOKE_SOURCES = ("/usr/lib/python3.11/email",)
TARBALL = "realwork.tar"
TREE = "realwork"
GIT_IDENTITY = {"user.name": "volfs bench", "user.email": "bench@volfs.invalid"}

Samples = Iterator[tuple[str, dict[str, Any]]]


@dataclass(frozen=True)
class SourceTree:
    """The tarball every target untars, and what it holds (members, not counting the root)."""

    tarball: str
    sources: list[str]
    files: int
    dirs: int
    symlinks: int
    bytes: int
    seconds_to_make: float

    @property
    def entries(self) -> int:
        """What find lists of the untarred tree: its members and the directory itself."""
        return self.files + self.dirs + self.symlinks + 1


def make_tree(workdir: Path, sources: list[str]) -> SourceTree:
    """A tarball of *sources* (each under its own name) without __pycache__, and its counts."""
    names = [Path(s).name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"the tree's sources must have different names: {', '.join(sources)}")
    tarball = workdir / TARBALL
    argv = ["tar", "-cf", str(tarball), "--exclude=__pycache__"]
    for source in map(Path, sources):
        if not source.is_dir():
            raise ValueError(f"{source} is not a directory to make the source tree from")
        argv += ["-C", str(source.parent), source.name]
    start = time.monotonic()
    run(argv)
    counts = {"files": 0, "dirs": 0, "symlinks": 0, "bytes": 0}
    with tarfile.open(tarball) as tar:
        for member in tar:
            kind = "dirs" if member.isdir() else "symlinks" if member.issym() else "files"
            counts[kind] += 1
            counts["bytes"] += member.size if member.isfile() else 0
    return SourceTree(str(tarball), list(sources), seconds_to_make=time.monotonic() - start,
                      **counts)  # fmt: skip


def describe(tree: SourceTree) -> dict[str, Any]:
    return {**asdict(tree), "entries": tree.entries}


def run(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run a tool; its stdout, or RuntimeError with the end of its stderr."""
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} exit {done.returncode}: {done.stderr.strip()[-500:]}")
    return done.stdout


def piped(producer: list[str], consumer: list[str], cwd: Path) -> str:
    """producer | consumer; the consumer's stdout. A pipe, not /dev/null: GNU tar skips
    reading the files when its archive is /dev/null."""
    first = subprocess.Popen(producer, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert first.stdout is not None
    try:
        second = subprocess.run(consumer, stdin=first.stdout, capture_output=True, text=True,
                                check=False)  # fmt: skip
    finally:
        first.stdout.close()
        errors = first.stderr.read().decode(errors="replace") if first.stderr else ""
        first.wait()
    if first.returncode != 0 or second.returncode != 0:
        failed = producer if first.returncode != 0 else consumer
        raise RuntimeError(f"{failed[0]} failed: {(errors or second.stderr).strip()[-500:]}")
    return second.stdout


def git_env(cfg: argparse.Namespace) -> dict[str, str]:
    """No system or user git config: the same git on every target, whoever runs the bench."""
    home = cfg.workdir / "git-home"
    home.mkdir(exist_ok=True)
    return dict(os.environ, HOME=str(home), GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL="/dev/null")


def timed(target: Target, operations: int, unit: str, work: Callable[[], object]) -> dict[str, Any]:
    """Time work(); with the requests it made of a volfs target per operation."""
    with requestcount.counted(target) as window:
        t0 = time.perf_counter()
        work()
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "requests": window.per(operations, unit)}


def cold(target: Target) -> bool:
    """Remount the target and drop the page cache: the next read starts from the disk."""
    target.refresh()
    return workloads.drop_caches()


def group(target: Target, cfg: argparse.Namespace, wanted: set[str]) -> Samples:
    """The real-work workloads on *target*, in the order of WORKLOADS."""
    tree: SourceTree = cfg.source_tree
    root = target.path / TREE
    git_entries = 0
    unsupported = []
    if tree.symlinks and not target.symlinks:
        unsupported = [w for w in WORKLOADS if w in wanted & TREE_WORKLOADS]
        wanted = wanted - TREE_WORKLOADS
    if wanted & TREE_WORKLOADS:
        if root.exists():
            run(["rm", "-rf", str(root)])  # a failed repeat's leftovers
        root.mkdir()
        Path(tree.tarball).read_bytes()  # the tarball comes from memory on every target
        os.sync()
        sample = timed(target, tree.files, "file",
                       lambda: run(["tar", "-xf", tree.tarball, "-C", str(root)]))  # fmt: skip
        if "untar" in wanted:
            yield "untar", {"value": tree.files / sample["seconds"], **sample}
    if "git_add_commit" in wanted:
        env = git_env(cfg)
        run(["git", "init", "-q", str(root)], env=env)
        for key, value in GIT_IDENTITY.items():
            run(["git", "-C", str(root), "config", key, value], env=env)
        os.sync()

        def add_commit() -> None:
            run(["git", "add", "-A"], cwd=root, env=env)
            run(["git", "commit", "-q", "-m", "the source tree"], cwd=root, env=env)

        sample = timed(target, tree.files, "file", add_commit)
        # Counted now (untimed, its pages warm from the commit), for rm -rf's figure.
        git_entries = 1 + sum(len(d) + len(f) for _, d, f in os.walk(root / ".git"))
        yield "git_add_commit", {"value": tree.files / sample["seconds"],
                                 "git_entries": git_entries, **sample}  # fmt: skip
    if "tar_read_cold" in wanted:
        dropped = cold(target)
        out: list[str] = []
        tar = ["tar", "-cf", "-", "--exclude=./.git", "."]
        sample = timed(target, tree.files, "file",
                       lambda: out.append(piped(tar, ["wc", "-c"], root)))  # fmt: skip
        if int(out[0]) < tree.bytes:
            raise RuntimeError(f"tar read {out[0].strip()} bytes of a {tree.bytes}-byte tree")
        yield "tar_read_cold", {"value": tree.bytes / 1e6 / sample["seconds"],
                                "caches_dropped": dropped, **sample}  # fmt: skip
    if "find_stat_cold" in wanted:
        dropped = cold(target)
        out = []
        find = ["find", ".", "-name", ".git", "-prune", "-o", "-printf", "%y %m %s %T@ %p\n"]
        sample = timed(target, tree.entries, "entry",
                       lambda: out.append(piped(find, ["wc", "-l"], root)))  # fmt: skip
        if int(out[0]) != tree.entries:
            raise RuntimeError(f"find listed {out[0].strip()} entries, expected {tree.entries}")
        yield "find_stat_cold", {"value": tree.entries / sample["seconds"],
                                 "caches_dropped": dropped, **sample}  # fmt: skip
    for mode, workload in (("wal", "sqlite_1row_wal"), ("delete", "sqlite_1row_rollback")):
        if workload in wanted:
            os.sync()
            db = target.path / f"realwork-{mode}.db"
            with requestcount.counted(target) as window:
                sample = workloads.sqlite_inserts(db, mode, cfg.one_row_txns, 1)
            yield workload, {**sample, "requests": window.per(cfg.one_row_txns, "txn")}
    if root.exists():
        os.sync()
        entries = tree.entries + git_entries
        sample = timed(target, entries, "entry", lambda: run(["rm", "-rf", str(root)]))
        if "rm_rf" in wanted:
            yield "rm_rf", {"value": entries / sample["seconds"], "entries": entries, **sample}
    if unsupported:
        reason = f"{target.name} cannot hold the tree's {tree.symlinks} symlinks"
        raise Unsupported(reason, unsupported)
