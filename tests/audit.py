"""Checks the fixtures run after every test that used a store: failures a test would not see.

The errno guard at the FUSE edge turns any bug into EIO plus a log line, so a test whose
assertions hold can still have broken the store or hit a traceback. After each such test:

* every volume of the store root, and each of its snapshots, is checked as ``volfsd fsck``
  checks it (the library check loaded read-only; snapshots by `checking.examine_snapshots`),
  once nothing serves it any more: no problem may be found;
* the store's logs (``logs/*.log``: each worker's and the daemon's) hold no traceback and no
  ERROR (or CRITICAL) record but those the test declared with ``@pytest.mark.expect_log``;
* the worker's open descriptors did not grow between the mount and the unmount (`FdWatch`).

A test that damages a store on purpose says so with ``@pytest.mark.store_damaged(reason)``,
and one that provokes error lines with ``@pytest.mark.expect_log(regex, ...)``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from volfs import checking
from volfs.errors import VolfsError
from volfs.store import check, readonly
from volfs.store.headers import NAME_PATTERN

MARKERS = (
    "expect_log(*patterns): ERROR lines or tracebacks matching one of these regexes are expected",
    "store_damaged(reason): the test leaves a volume damaged on purpose: no fsck-clean check",
)

#: Descriptors a worker may hold at the unmount beyond what it held once mounted, segment
#: files not counted: a pipe pair of trio's worker threads, a checkpoint writer's pidfd, a
#: control connection of the daemon's. (Measured: a settled worker holds 13, and 15 besides
#: its segments after a few hundred requests.) A leak per request or per open file exceeds
#: this within a few dozen calls.
FD_ALLOWANCE = 8
#: A log segment of the volume's: the log keeps up to MAX_OPEN_SEGMENTS of them open, by design.
_SEGMENT = re.compile(r"/seg-\d+\.log$")

#: The start of a record in a volfs log: "2026-12-01 12:00:00,123 volfsd[PID] LEVEL ..." (the
#: daemon's and workers'), or "2026-12-01 12:00:00 volfsd ARGS: internal error" (_cli.log's).
_RECORD = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:,\d+)? volfsd(?:\[\d+\] (?P<level>[A-Z]+) )?", re.M
)


TRACEBACK = "Traceback (most recent call last)"


def expected_log(node: pytest.Item) -> list[str]:
    """The regexes a test's ``expect_log`` markers declare."""
    return [pattern for mark in node.iter_markers("expect_log") for pattern in mark.args]


def volume_dirs(root: Path) -> Iterator[Path]:
    """The volume directories of store *root* (entries that are not volumes are skipped)."""
    volumes = root / "volumes"
    if not volumes.is_dir() or volumes.is_symlink():
        return
    for entry in sorted(volumes.iterdir()):
        header = entry / "volume"
        if entry.is_dir() and not entry.is_symlink() and header.is_file():
            yield entry


def store_problems(root: Path) -> list[str]:
    """What a check of every volume in store *root* finds, one line each (empty: clean)."""
    found = []
    for volume_dir in volume_dirs(root):
        name = volume_dir.name
        try:
            loaded = readonly.open_readonly(volume_dir, name)
        except Exception as exc:  # the check itself failed: as much a finding as a problem
            found.append(f"volume {name}: cannot be checked: {exc!r}")
            continue
        try:
            report = check.examine(loaded)
        finally:
            loaded.close()
        found += [f"volume {name}: {problem.path}: {problem.what}" for problem in report.problems]
        if NAME_PATTERN.fullmatch(name):  # not a hidden one being made or removed
            found += snapshot_problems(root, name)
    return found


def snapshot_problems(root: Path, name: str) -> list[str]:
    """What a check of each snapshot of volume *name* finds (as `store_problems` words it)."""
    found = []
    try:
        examined = list(checking.examine_snapshots(root, name, "fsck", show=False))
    except (VolfsError, OSError) as exc:
        return [f"volume {name}: its snapshots cannot be listed: {exc!r}"]
    for label, outcome in examined:
        if isinstance(outcome, VolfsError):
            found.append(f"snapshot {label}: cannot be checked: {outcome}")
        else:
            found += [f"snapshot {label}: {p.path}: {p.what}" for p in outcome.problems]
    return found


def log_records(text: str) -> Iterator[tuple[str | None, str]]:
    """The records of a log as (level, text); a traceback belongs to the record it follows.

    Text before the first record (what a process wrote to its stderr before logging was set
    up, or an uncaught exception's traceback) is a record of level None.
    """
    starts = [m.start() for m in _RECORD.finditer(text)]
    head = text[: starts[0] if starts else len(text)]
    if head.strip():
        yield None, head
    if not starts:
        return
    for start, stop in zip(starts, [*starts[1:], len(text)], strict=True):
        record = text[start:stop]
        match = _RECORD.match(record)
        yield (match["level"] if match else None), record


def log_faults(root: Path, expected: Iterable[str] = ()) -> list[str]:
    """The ERROR/CRITICAL records and tracebacks in store *root*'s logs that match none of the
    *expected* regexes, each prefixed with the log's name."""
    patterns = [re.compile(p) for p in expected]
    logs = root / "logs"
    if not logs.is_dir() or logs.is_symlink():
        return []
    faults = []
    for path in sorted(logs.glob("*.log")):
        if not path.is_file() or path.is_symlink():
            continue
        for level, record in log_records(path.read_text(errors="replace")):
            if level not in ("ERROR", "CRITICAL") and TRACEBACK not in record:
                continue
            if not any(p.search(record) for p in patterns):
                faults.append(f"{path.name}: {record.rstrip()}")
    return faults


def check_store(root: Path, node: pytest.Item, expected: Iterable[str] = ()) -> None:
    """Fail unless store *root* checks clean and its logs hold nothing the test did not expect.

    Call it once nothing serves the store's volumes any more. *expected*: log patterns
    the fixtures declare besides the test's markers.
    """
    if not node.get_closest_marker("store_damaged"):
        problems = store_problems(root)
        assert not problems, "the store is not fsck-clean after the test:\n" + "\n".join(problems)
    faults = log_faults(root, [*expected_log(node), *expected])
    assert not faults, "unexpected errors in the store's logs:\n" + "\n\n".join(faults)


def open_fds(pid: int) -> dict[int, str]:
    """The open descriptors of *pid* and what each refers to (empty if it is gone)."""
    fds = {}
    try:
        entries = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return {}
    for entry in entries:
        try:
            fds[int(entry)] = os.readlink(f"/proc/{pid}/fd/{entry}")
        except OSError:
            continue  # closed meanwhile
    return fds


class FdWatch:
    """The descriptors one worker held after its mount, to compare with those at its unmount.

    Open log segments are not counted (the log's cache of them is bounded by
    `volfs.store.log.MAX_OPEN_SEGMENTS`), but one whose file was deleted is always a leak: it
    holds the disk space of a segment that compaction or a checkpoint gave up.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.after_mount = open_fds(pid)

    def check(self) -> None:
        """Fail if the worker now holds more than `FD_ALLOWANCE` descriptors beyond those it
        held after the mount, or a new one of a deleted file (nothing, if it is gone)."""
        now = open_fds(self.pid)
        new = {fd: t for fd, t in now.items() if self.after_mount.get(fd) != t}
        deleted = [f"{fd} -> {t}" for fd, t in sorted(new.items()) if t.endswith(" (deleted)")]
        assert not deleted, f"worker {self.pid} holds deleted files open:\n" + "\n".join(deleted)
        before, after = (
            {fd: t for fd, t in fds.items() if not _SEGMENT.search(t)}
            for fds in (self.after_mount, now)
        )
        if not now or len(after) <= len(before) + FD_ALLOWANCE:
            return
        grown = [f"{fd} -> {t}" for fd, t in sorted(new.items()) if not _SEGMENT.search(t)]
        raise AssertionError(
            f"worker {self.pid} held {len(before)} descriptors (log segments aside) after the "
            f"mount and {len(after)} before the unmount; new ones:\n" + "\n".join(grown)
        )
