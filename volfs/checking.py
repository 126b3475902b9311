"""`volfsd fsck` and `volfsd scrub`: verify a volume's store and name what is damaged, by path.

This is the command-line driver; the checks themselves are in `volfs.store.check`.  Both load a
read-only snapshot of the volume (`volfs.store.readonly`) and verify every checksum in it: the
checkpoint's and the log's frames as they replay, then every block of live data.

* fsck holds the volume's lock, so the volume must not be served; it reads at full speed and can
  repair what needs no guessing (``--repair``).
* scrub takes no lock and reads at a bounded rate (a token bucket), so it can run against a
  served volume without disturbing its server, or against one that is not served.

Both then check each of the volume's snapshots, each loaded under its shared lock
(`history.load`), and name the snapshot (``NAME@SNAP``) in each line about it; ``NAME@SNAP``
checks that snapshot alone, whether the volume is served or not.  A snapshot is never
repaired.  The exit status covers the volume and all its snapshots.

Problems go to stdout, one line each, naming the file; progress goes to stderr, as a bar on a
terminal and as a line every `LINE_INTERVAL` seconds otherwise.  Exit status: 0 clean, 1 damage
found, 2 the volume could not be checked (one line on stderr).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple, TextIO

from volfs.errors import ErrorCode, VolfsError
from volfs.store import check, headers, history, pidlock, readonly, snapshots
from volfs.store.headers import check_name
from volfs.store.root import StoreRoot

CLEAN, DAMAGED, UNCHECKED = 0, 1, 2
#: scrub's default rate, in MB/s (10^6 bytes a second)
DEFAULT_RATE = 50.0
#: Seconds between progress lines when stderr is not a terminal (a log, a pipe).
LINE_INTERVAL = 10.0
#: Seconds between redraws of the progress bar on a terminal.
BAR_INTERVAL = 0.2


class Progress:
    """How far a check has got: a bar redrawn in place on a terminal, else a line now and then."""

    WIDTH = 30

    def __init__(self, label: str, total: int, stream: TextIO, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.label, self.total, self.stream = label, total, stream
        self.tty = stream.isatty() if tty is None else tty
        self._clock = clock
        self._start = clock()
        self._interval = BAR_INTERVAL if self.tty else LINE_INTERVAL
        self._next = self._start + self._interval
        self._drawn = False

    def update(self, done: int) -> None:
        now = self._clock()
        if now >= self._next:
            self._next = now + self._interval
            self._draw(done, now)

    def finish(self) -> None:
        """End the bar's line (the report follows on stdout)."""
        if self._drawn and self.tty:
            self._draw(self.total, self._clock())
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, done: int, now: float) -> None:
        percent = min(100, done * 100 // self.total) if self.total else 100
        rate = done / max(now - self._start, 1e-6)
        figures = f"{percent:3d}% {done / 1e6:.1f}/{self.total / 1e6:.1f} MB, {rate / 1e6:.0f} MB/s"
        if self.tty:
            filled = self.WIDTH * percent // 100
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            self.stream.write(f"\r{self.label} [{bar}] {figures}\x1b[K")
        else:
            self.stream.write(f"{self.label}: {figures}\n")
        self.stream.flush()
        self._drawn = True


class Throttle:
    """A token bucket: on average at most *rate* bytes a second, in bursts of at most 1/10 s."""

    def __init__(
        self,
        rate: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._rate = rate
        self._burst = max(64 * 1024, rate / 10)
        self._tokens = self._burst
        self._clock, self._sleep = clock, sleep
        self._last = clock()

    def __call__(self, nbytes: int) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate) - nbytes
        self._last = now
        if self._tokens < 0:
            self._sleep(-self._tokens / self._rate)


def _volume_dir(root: Path, name: str) -> Path:
    path = Path(root) / "volumes" / check_name(name)
    if not (path / "volume").is_file():
        raise VolfsError(f"no such volume: {name}", ErrorCode.NOT_FOUND)
    return path


def _examine(loaded: readonly.ReadOnlyState, action: str, show: bool = True) -> check.Report:
    """Check a loaded volume or snapshot (named ``NAME`` or ``NAME@SNAP``); with *show*, with
    progress on stderr and the report on stdout, each line of a snapshot's naming it."""
    if not show:
        return check.examine(loaded)
    label = loaded.name
    progress = Progress(f"{action} {label}", loaded.data_bytes(), sys.stderr)
    report = check.examine(loaded, progress.update)
    progress.finish()
    kind, prefix = ("snapshot", f"{label}: ") if "@" in label else ("volume", "")
    print(f"{kind} {label}: {len(loaded.inodes)} inodes, {report.verified} bytes of data "
          f"verified, {len(report.problems)} problem(s)")  # fmt: skip
    for problem in report.problems:
        print(f"  {prefix}{problem.path}: {problem.what}")
    for note in report.notes:
        print(f"note: {prefix}{note}")
    return report


def _examine_volume(volume_dir: Path, name: str, action: str, pace: readonly.Pace | None = None
                    ) -> check.Report:  # fmt: skip
    loaded = readonly.open_readonly(volume_dir, name, pace)
    try:
        return _examine(loaded, action)
    finally:
        loaded.close()


def examine_snapshot(
    store: StoreRoot, name: str, snap: str, action: str, pace: readonly.Pace | None = None,
    show: bool = True,
) -> check.Report:  # fmt: skip
    """Check snapshot *name*@*snap*, loaded read-only under its shared lock (`history.load`),
    so that it is not removed meanwhile; nothing in it is ever repaired."""
    loaded, held = history.load(store, name, snap, pace)
    try:
        return _examine(loaded, action, show)
    finally:
        loaded.close()
        os.close(held)


def examine_snapshots(
    root: Path, name: str, action: str, pace: readonly.Pace | None = None,
    show: bool = True,
) -> Iterator[tuple[str, check.Report | VolfsError]]:  # fmt: skip
    """Check each snapshot of volume *name*: (NAME@SNAP, its report, or why it could not be
    checked).  One removed while the others are checked is left out."""
    if not (Path(root) / "volumes" / name / snapshots.SNAPSHOTS_DIR).exists():
        return  # never snapshotted: the store root is not opened (`StoreRoot` repairs modes)
    store = StoreRoot(root)
    for snap in history.names(store, name):
        label = f"{name}@{snap}"
        try:
            yield label, examine_snapshot(store, name, snap, action, pace, show)
        except VolfsError as exc:
            if exc.code is not ErrorCode.NOT_FOUND:  # else removed since it was listed
                yield label, exc


def _fail(action: str, name: str, exc: BaseException) -> int:
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        what = "snapshot" if "@" in name else "volume"
        text = f"cannot {action} {what} {name}: {exc.strerror or exc}{where}"
    else:
        text = str(exc)
    print(f"volfsd: {text}", file=sys.stderr)
    return UNCHECKED


def _with_snapshots(root: Path, name: str, first: check.Report, action: str,
                    pace: readonly.Pace | None = None) -> tuple[int, int]:  # fmt: skip
    """Check the snapshots of volume *name*, whose own check gave *first*: the exit status of
    all (UNCHECKED if one could not be checked, else DAMAGED if any has a problem) and how
    many problems the snapshots have."""
    status = DAMAGED if first.problems else CLEAN
    damaged, checked = [name] if first.problems else [], 0
    found = 0
    for label, outcome in examine_snapshots(root, name, action, pace):
        checked += 1
        problems = _snapshot_problems(label, outcome)
        if problems:
            damaged.append(label)
            found += len(problems)
            status = max(status, DAMAGED)
            if not isinstance(outcome, check.Report):
                print(f"snapshot {label}: not loaded, 1 problem(s)")
                print(f"  {label}: {outcome}")
        elif isinstance(outcome, VolfsError):
            status = max(status, _fail("check", label, outcome))
    if checked:
        where = f": in {', '.join(damaged)}" if damaged else ""
        print(f"{action} of {name} and its {checked} snapshot(s): "
              f"{'damage found' if damaged else 'clean'}{where}")  # fmt: skip
    return status, found


def _snapshot_problems(label: str, outcome: check.Report | VolfsError) -> list[check.Problem]:
    """What a snapshot's check found: its problems, or its damaged header or checkpoint as
    one (a snapshot that could not be checked for another reason has none)."""
    if isinstance(outcome, check.Report):
        return outcome.problems
    if outcome.code is ErrorCode.DAMAGED:
        return [check.Problem("(store)", str(outcome), check.ProblemKind.METADATA)]
    return []


def scrub(root: Path, name: str, rate: float = DEFAULT_RATE) -> int:
    """Verify every checksum of volume *name*, served or not, then of each of its snapshots,
    at *rate* MB/s (0: no limit); or of one snapshot (*name* ``NAME@SNAP``)."""
    try:
        pace = Throttle(rate * 1e6) if rate > 0 else None
        if "@" in name:
            volume, snap = snapshots.parse_name(name)
            _volume_dir(root, volume)
            report = examine_snapshot(StoreRoot(root), volume, snap, "scrub", pace)
            return DAMAGED if report.problems else CLEAN
        volume_dir = _volume_dir(root, name)
        report = _examine_volume(volume_dir, name, "scrub", pace)
        status, in_snapshots = _with_snapshots(root, name, report, "scrub", pace)
        _note_scrub(root, name, report, status, len(report.problems) + in_snapshots)
        return status
    except (VolfsError, OSError) as exc:
        return _fail("scrub", name, exc)


class Finding(NamedTuple):
    """A problem a scrub found, and in what: the volume (``NAME``) or a snapshot."""

    label: str
    problem: check.Problem


def scrub_quietly(root: Path, name: str, rate: float = DEFAULT_RATE) -> list[Finding]:
    """Scrub volume *name* and its snapshots as `scrub` does, printing nothing (the daemon's
    scheduled scrubs, `scrub_schedule`); what it found is kept as `scrub` keeps it.  Returns
    the problems found, each with where (``NAME`` or ``NAME@SNAP``); empty: clean."""
    pace = Throttle(rate * 1e6) if rate > 0 else None
    loaded = readonly.open_readonly(_volume_dir(root, name), name, pace)
    try:
        report = _examine(loaded, "scrub", show=False)
    finally:
        loaded.close()
    found = [Finding(name, p) for p in report.problems]
    for label, outcome in examine_snapshots(root, name, "scrub", pace, show=False):
        found += [Finding(label, p) for p in _snapshot_problems(label, outcome)]
    _note_scrub(root, name, report, DAMAGED if found else CLEAN, len(found))
    return found


def _note_scrub(root: Path, name: str, report: check.Report, status: int, found: int) -> None:
    """Leave what the scrub found beside the logs, ``logs/NAME.scrubbed``, for `status`,
    `inspect` and the metrics: never in the volume's directory, which a scrub does not change
    (advisory: a file that cannot be written is only warned of).  *found* (problems in the
    volume and its snapshots) adds to ``found_total``, what every scrub found so far."""
    before = headers.read_scrubbed(root, name) or {}
    figures = {"at_ns": time.time_ns(), "verified": report.verified,
               "problems": found, "damaged": status == DAMAGED,
               "found_total": before.get("found_total", 0) + found}  # fmt: skip
    try:
        headers.note_scrubbed(root, name, figures)
    except OSError as exc:
        print(f"volfsd: warning: the scrub's result was not kept: {exc.strerror}", file=sys.stderr)


def fsck(root: Path, name: str, repair: bool = False) -> int:
    """Check volume *name*, which must not be served, then each of its snapshots; with
    *repair*, fix what needs no guess in the volume.  *name* ``NAME@SNAP``: that snapshot
    only (served or not; never repaired)."""
    try:
        if "@" in name:
            volume, snap = snapshots.parse_name(name)
            if repair:
                raise VolfsError(f"{name} is a snapshot, and a snapshot is never repaired: "
                                 f"clone it (volfsd clone {name} NEW) and repair the clone",
                                 ErrorCode.INVALID)  # fmt: skip
            _volume_dir(root, volume)
            report = examine_snapshot(StoreRoot(root), volume, snap, "fsck")
            return DAMAGED if report.problems else CLEAN
        volume_dir = _volume_dir(root, name)
        try:
            lock_fd = pidlock.take_in(volume_dir, "lock")  # nobody may serve it meanwhile
        except pidlock.LockHeld:
            raise VolfsError(f"volume {name} is mounted: unmount it before checking it, "
                             "or scrub it", ErrorCode.BUSY) from None  # fmt: skip
        try:
            report = _examine_volume(volume_dir, name, "fsck")
        finally:
            os.close(lock_fd)
        if repair and report.problems:
            report = _repair(root, volume_dir, name, report)
        return _with_snapshots(root, name, report, "fsck")[0]
    except (VolfsError, OSError) as exc:
        return _fail("check", name, exc)


def _repair(root: Path, volume_dir: Path, name: str, report: check.Report) -> check.Report:
    if not check.orphans(report.problems):
        print("nothing to repair without guessing (reads of damaged data keep failing with EIO)")
        return report
    volume = StoreRoot(root).open_volume(name, create=False)
    # It only names files that are counted already: no limit may keep a full volume unrepaired.
    volume.quota = volume.inode_limit = 0
    try:
        for change in check.repair(volume, report.problems):
            print(f"  repaired: {change}")
    finally:
        volume.close()  # the checkpoint settles link counts and accounting
    print("after repair:")
    return _examine_volume(volume_dir, name, "fsck")
