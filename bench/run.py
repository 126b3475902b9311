#!/usr/bin/env python3
"""Benchmark the hot read/write path of FUSE mounts against the native disk.

Absolute numbers from small, shared VMs swing by tens of percent between runs,
so every target is measured in the same run as a plain directory on the same
disk and the result that matters is the ratio of medians to that baseline.

    python bench/run.py --targets native,volfs,bindfs --size 1G --repeats 3
    python bench/run.py --targets native,bindfs --smoke

Exit status: 0 when the run completed (targets that could not be set up are
reported as "missing" but do not fail the run), 1 when a target that was set up
broke during a workload, 2 when a mount could not be removed, 130 on interrupt.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
MIB = 1024 * 1024

WORKLOADS = ("seqwrite", "seqread_cold", "seqread_warm", "randread4k", "randwrite4k", "smallfiles")
UNITS = {
    "seqwrite": "MB/s",
    "seqread_cold": "MB/s",
    "seqread_warm": "MB/s",
    "randread4k": "IOPS",
    "randwrite4k": "IOPS",
    "smallfiles": "files/s",
}
# Workloads that need the SIZE test file to exist; they run after seqwrite made it.
FILE_WORKLOADS = ("seqread_cold", "seqread_warm", "randread4k", "randwrite4k")
ALL_TARGETS = ("native", "volfs", "bindfs")

DEFAULTS = {"size": 1024 * MIB, "runtime": 10, "repeats": 3, "files": 2000}
SMOKE = {"size": 8 * MIB, "runtime": 1, "repeats": 1, "files": 200}

# Longer than volfsd's own 60 s mount timeout, so its own error and cleanup win.
MOUNT_TIMEOUT_S = 90.0
MOUNT_LIVE_WAIT_S = 10.0
DATA_FILE = "fio.dat"


class TargetMissing(Exception):
    """The target cannot be set up on this machine (not installed, mount refused)."""


# --------------------------------------------------------------------------- mounts


def _unescape(field: str) -> str:
    # The kernel escapes space, tab, newline and backslash in mount paths as octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def mounted_paths() -> set[str]:
    """Mount points from /proc/mounts, read rather than stat()ed: a hung mount hangs stat."""
    with open("/proc/mounts", encoding="utf-8") as fh:
        return {_unescape(f[1]) for f in (line.split() for line in fh) if len(f) >= 2}


def is_mounted(path: Path) -> bool:
    return str(path) in mounted_paths()


def mounts_under(root: Path) -> list[Path]:
    prefix = str(root).rstrip("/") + "/"
    return sorted(Path(p) for p in mounted_paths() if p.startswith(prefix))


def run_logged(argv: list[str], log: Path, *, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run a mount helper with output in a file, not a pipe.

    A daemonising mount command can hand its stdout to the daemon, and reading
    a pipe until EOF would then block for as long as the mount lives.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        fh.write(f"$ {shlex.join(argv)}\n".encode())
        fh.flush()
        start = fh.tell()
        try:
            # A new session keeps a terminal Ctrl-C away from the FUSE daemon, so the
            # mount stays healthy until our own cleanup unmounts it.
            rc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=MOUNT_TIMEOUT_S,
                start_new_session=True,
                check=False,
            ).returncode
        except subprocess.TimeoutExpired:
            rc = -1
            fh.write(f"(no exit after {MOUNT_TIMEOUT_S:.0f}s, killed)\n".encode())
        except OSError as exc:
            rc = 127
            fh.write(f"{exc}\n".encode())
    with open(log, "rb") as fh:
        fh.seek(start)
        tail = fh.read().decode(errors="replace").strip().splitlines()[-12:]
    return rc, "\n".join(tail)


def fuse_connection(path: Path) -> Path | None:
    """The fusectl directory of the FUSE mount at path, found without touching the mount."""
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for fields in (line.split() for line in fh):
            if len(fields) > 4 and _unescape(fields[4]) == str(path):
                return Path("/sys/fs/fuse/connections") / fields[2].split(":")[1]
    return None


def force_unmount(path: Path, log: Path) -> bool:
    """Unmount with fusermount3, retrying while busy, lazily as a last resort.

    A lazy unmount hides the mount but a wedged daemon keeps the connection,
    and anything blocked on it, alive; aborting the connection through fusectl
    (when mounted) frees them.
    """
    for attempt in range(5):
        if not is_mounted(path):
            return True
        run_logged(["fusermount3", "-u", str(path)], log)
        time.sleep(0.2 * attempt)
    conn = fuse_connection(path)
    run_logged(["fusermount3", "-uz", str(path)], log)
    deadline = time.monotonic() + 5.0
    while conn is not None and conn.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if conn is not None and conn.exists():
        with contextlib.suppress(OSError), open(log, "a", encoding="utf-8") as fh:
            fh.write(f"aborting wedged FUSE connection {conn}\n")
            (conn / "abort").write_text("1\n")
    return not is_mounted(path)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold Ctrl-C/SIGTERM until a mount or unmount has finished.

    Interrupting `volfsd mount` half way could leave its worker to mount after
    our cleanup has already looked; deferring keeps the mount state known.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        yield  # already shielded during cleanup: nothing to defer, nothing to re-raise
        return
    pending: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, lambda signum, _frame: pending.append(signum)) for s in sigs}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if pending:
        raise KeyboardInterrupt(f"signal {pending[0]}")


# --------------------------------------------------------------------------- targets


class Target:
    """A directory to run workloads in, plus whatever it takes to provide it."""

    name = "?"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log = workdir / "logs" / f"{self.name}.log"
        self.path = workdir / self.name

    def setup(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def teardown(self) -> bool:
        """Return False only if something could not be cleaned up."""
        return True

    def refresh(self) -> None:
        """Start the next read from nothing the filesystem itself has cached."""

    def diagnostics(self) -> str:
        """The daemon's own log tail, which usually says more than the failing syscall."""
        return ""


class NativeTarget(Target):
    name = "native"


class MountTarget(Target):
    """A FUSE mount whose teardown must never leave the mount behind."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.mountpoint = workdir / f"mnt-{self.name}"
        self.path = self.mountpoint

    def mount_argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        """Environment for the mount and unmount commands; None inherits ours."""
        return None

    def unmount_argv(self) -> list[str] | None:
        """A target-specific unmount command tried before fusermount3."""
        return None

    def setup(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if is_mounted(self.mountpoint):
            raise TargetMissing(f"{self.mountpoint} is already mounted by someone else")
        argv = self.mount_argv()
        with deferred_interrupts():
            rc, tail = run_logged(argv, self.log, env=self.env())
            deadline = time.monotonic() + MOUNT_LIVE_WAIT_S
            while rc == 0 and not is_mounted(self.mountpoint) and time.monotonic() < deadline:
                time.sleep(0.05)
        if rc != 0 or not is_mounted(self.mountpoint):
            self.teardown()  # a timed-out command may still have mounted
            why = f"exit {rc}" if rc != 0 else "exited 0 but no mount appeared"
            extra = self.diagnostics()
            extra = f"\ndaemon log:\n{extra}" if extra else ""
            raise TargetMissing(f"mount failed ({why}): {tail or 'no output'}{extra}")

    def teardown(self) -> bool:
        with deferred_interrupts():
            if not is_mounted(self.mountpoint):
                return True
            argv = self.unmount_argv()
            if argv is not None:
                run_logged(argv, self.log, env=self.env())
            return force_unmount(self.mountpoint, self.log)

    def refresh(self) -> None:
        # Remount so the daemon's in-memory caches start empty, as after a restart.
        if not self.teardown():
            raise RuntimeError(f"could not unmount {self.mountpoint} to remount it")
        try:
            self.setup()
        except TargetMissing as exc:
            raise RuntimeError(f"remount failed: {exc}") from None


class VolfsTarget(MountTarget):
    name = "volfs"

    def env(self) -> dict[str, str] | None:
        env = dict(
            os.environ,
            VOLFS_ROOT=str(self.workdir / "store"),
            VOLFS_RUN_DIR=str(self.workdir / "run"),  # a daemon of our own, stopped at teardown
        )
        # Prefer the checkout next to this script over any installed copy.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        return env

    def _command(self) -> list[str]:
        for candidate in (Path(sys.executable).parent / "volfsd", shutil.which("volfsd")):
            if candidate and os.access(candidate, os.X_OK):
                return [str(candidate)]
        # find_spec rather than import: importing __main__ may run the CLI.
        check = (
            "import importlib.util, sys, volfs; "
            "sys.exit(importlib.util.find_spec('volfs.__main__') is None and "
            "'volfs has no __main__, so python -m volfs cannot work')"
        )
        probe = subprocess.run(
            [sys.executable, "-c", check],
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=60,
            check=False,
        )
        if probe.returncode != 0:
            last = (probe.stderr.strip().splitlines() or ["unknown error"])[-1]
            raise TargetMissing(f"volfs not importable: {last}")
        return [sys.executable, "-m", "volfs"]

    def diagnostics(self) -> str:
        # volfsd writes the worker's output to <VOLFS_ROOT>/logs/<volume>.log.
        path = self.workdir / "store" / "logs" / "bench.log"
        try:
            return "\n".join(path.read_text(errors="replace").strip().splitlines()[-20:])
        except OSError:
            return ""

    def mount_argv(self) -> list[str]:
        (self.workdir / "store").mkdir(parents=True, exist_ok=True)
        self._cmd = self._command()
        return [*self._cmd, "mount", "bench", str(self.mountpoint)]

    def unmount_argv(self) -> list[str] | None:
        cmd = getattr(self, "_cmd", None)
        return [*cmd, "umount", str(self.mountpoint)] if cmd else None

    def teardown(self) -> bool:
        unmounted = super().teardown()
        self._stop_daemon()
        return unmounted

    def _stop_daemon(self) -> None:
        """End the volfsd daemon that `volfsd mount` started for this run dir."""
        try:
            pid = int((self.workdir / "run" / "volfsd.pid").read_text().split()[0])
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError, IndexError):
            return
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


class BindfsTarget(MountTarget):
    name = "bindfs"

    def mount_argv(self) -> list[str]:
        if shutil.which("bindfs") is None:
            raise TargetMissing("bindfs is not installed (apt-get install bindfs)")
        src = self.workdir / "bindfs-src"
        src.mkdir(parents=True, exist_ok=True)
        return ["bindfs", str(src), str(self.mountpoint)]


TARGET_CLASSES: dict[str, type[Target]] = {
    "native": NativeTarget,
    "volfs": VolfsTarget,
    "bindfs": BindfsTarget,
}


# --------------------------------------------------------------------------- workloads


def drop_caches() -> bool:
    """Evict the page cache; without root the cold read is only as cold as fio's fadvise."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def run_fio(
    name: str,
    filename: Path,
    rw: str,
    bs: str,
    size: int,
    logdir: Path,
    *,
    runtime: int | None = None,
    end_fsync: bool = False,
    invalidate: bool = False,
) -> dict[str, Any]:
    """One single-threaded buffered fio job; returns its JSON job record plus argv."""
    out = logdir / f"fio-{name}.json"
    argv = [
        "fio",
        f"--name={name}",
        f"--filename={filename}",
        f"--rw={rw}",
        f"--bs={bs}",
        f"--size={size}",
        "--ioengine=psync",
        "--direct=0",
        "--iodepth=1",
        "--numjobs=1",
        # fio preallocates by default, which turns seqwrite into an overwrite of
        # unwritten extents natively and is not supported by every FUSE fs.
        "--fallocate=none",
        # fio's default invalidate=1 would fadvise the file out of cache and turn
        # the "warm" reads cold; only the cold read wants that.
        f"--invalidate={int(invalidate)}",
        # The fsync is inside fio's measured runtime, so writes are timed to disk.
        f"--end_fsync={int(end_fsync)}",
        "--output-format=json",
        f"--output={out}",
    ]
    if runtime is not None:
        argv += ["--time_based", f"--runtime={runtime}s"]
    logdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"fio {name} exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
    job = json.loads(out.read_text())["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio {name} error {job['error']}: {proc.stderr.strip()[-500:]}")
    job["argv"] = argv
    return job


def fio_sample(job: dict[str, Any], direction: str, unit: str) -> dict[str, Any]:
    d = job[direction]
    clat = d.get("clat_ns", {})
    pct = clat.get("percentile", {})
    value = d["bw_bytes"] / 1e6 if unit == "MB/s" else d["iops"]
    return {
        "value": value,
        "io_bytes": d["io_bytes"],
        "runtime_ms": d["runtime"],
        "bw_bytes": d["bw_bytes"],
        "iops": d["iops"],
        "clat_mean_us": clat.get("mean", 0.0) / 1e3,
        "clat_p50_us": pct.get("50.000000", 0) / 1e3,
        "clat_p99_us": pct.get("99.000000", 0) / 1e3,
        "fio_argv": job["argv"],
    }


def seq_sample(job: dict[str, Any], direction: str, size: int) -> dict[str, Any]:
    """A sequential pass must move the whole file, or its MB/s describes something else."""
    sample = fio_sample(job, direction, "MB/s")
    if sample["io_bytes"] != size:
        raise RuntimeError(f"{job['jobname']} moved {sample['io_bytes']} of {size} bytes")
    return sample


def smallfiles(directory: Path, count: int) -> dict[str, Any]:
    """Metadata-heavy churn in one directory; os-level calls keep Python overhead small."""
    d = directory / "smallfiles"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir()
    payload = os.urandom(4096)
    names = [str(d / f"f{i:06d}") for i in range(count)]
    t0 = time.perf_counter()
    for name in names:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if os.write(fd, payload) != len(payload):
                raise RuntimeError(f"short write to {name}")
        finally:
            os.close(fd)
    t1 = time.perf_counter()
    for name in names:
        if os.stat(name).st_size != len(payload):
            raise RuntimeError(f"{name} has the wrong size after write")
    t2 = time.perf_counter()
    for name in names:
        os.unlink(name)
    t3 = time.perf_counter()
    d.rmdir()
    return {
        "value": count / (t3 - t0),
        "files": count,
        "seconds": t3 - t0,
        "create_per_s": count / (t1 - t0),
        "stat_per_s": count / (t2 - t1),
        "unlink_per_s": count / (t3 - t2),
    }


def target_pass(target: Target, cfg: argparse.Namespace) -> Iterator[tuple[str, dict[str, Any]]]:
    """All selected workloads on one target, in the order the file's cache state needs.

    Yields as it goes so results measured before a failure are kept.
    """
    logdir = cfg.workdir / "logs"
    data = target.path / DATA_FILE
    size = cfg.size
    wanted = set(cfg.workloads)
    if wanted & {"seqwrite", *FILE_WORKLOADS}:
        # A fresh file each time, so every repeat allocates the same way.
        data.unlink(missing_ok=True)
        os.sync()
        job = run_fio("seqwrite", data, "write", "1M", size, logdir, end_fsync=True)
        sample = seq_sample(job, "write", size)
        if "seqwrite" in wanted:
            yield "seqwrite", sample
    if wanted & set(FILE_WORKLOADS) and (actual := data.stat().st_size) != size:
        # Otherwise fio silently extends a short file and the reads look fine.
        raise RuntimeError(f"{data} is {actual} bytes after writing {size}")
    if "seqread_cold" in wanted:
        target.refresh()
        dropped = drop_caches()
        job = run_fio("seqread_cold", data, "read", "1M", size, logdir, invalidate=True)
        yield "seqread_cold", {**seq_sample(job, "read", size), "caches_dropped": dropped}
    if "seqread_warm" in wanted:
        os.sync()
        job = run_fio("seqread_warm", data, "read", "1M", size, logdir)
        yield "seqread_warm", seq_sample(job, "read", size)
    if "randread4k" in wanted:
        os.sync()
        job = run_fio("randread4k", data, "randread", "4k", size, logdir, runtime=cfg.runtime)
        yield "randread4k", fio_sample(job, "read", "IOPS")
    if "randwrite4k" in wanted:
        os.sync()
        job = run_fio(
            "randwrite4k",
            data,
            "randwrite",
            "4k",
            size,
            logdir,
            runtime=cfg.runtime,
            end_fsync=True,
        )
        yield "randwrite4k", fio_sample(job, "write", "IOPS")
    data.unlink(missing_ok=True)
    if "smallfiles" in wanted:
        os.sync()
        yield "smallfiles", smallfiles(target.path, cfg.files)


def warm_up_disk(native_dir: Path, cfg: argparse.Namespace) -> float:
    """Touch SIZE worth of disk first: fresh virtual-disk blocks write slower once."""
    start = time.monotonic()
    path = native_dir / "warmup.dat"
    try:
        run_fio("warmup", path, "write", "1M", cfg.size, cfg.workdir / "logs", end_fsync=True)
    finally:
        path.unlink(missing_ok=True)
    return time.monotonic() - start


# --------------------------------------------------------------------------- reporting


def capture(argv: list[str]) -> str | None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if proc.returncode == 0 and text else None


def machine_facts(workdir: Path) -> dict[str, Any]:
    """What a reader needs to judge whether two result files are comparable."""
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    mem = re.search(r"MemTotal:\s+(\d+) kB", meminfo)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.+)", cpuinfo)
    fstype = None
    with open("/proc/mounts", encoding="utf-8") as fh:
        best = ""
        for line in fh:
            fields = line.split()
            mp = fields[1]
            if (str(workdir) + "/").startswith(mp.rstrip("/") + "/") and len(mp) >= len(best):
                best, fstype = mp, fields[2]
    try:
        pyfuse3 = importlib.metadata.version("pyfuse3")
    except importlib.metadata.PackageNotFoundError:
        pyfuse3 = None
    return {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model[1].strip() if model else None,
        "mem_total_mib": int(mem[1]) // 1024 if mem else None,
        "libfuse": capture(["pkg-config", "--modversion", "fuse3"]),
        "fusermount3": capture(["fusermount3", "--version"]),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "pyfuse3": pyfuse3,
        "fio": capture(["fio", "--version"]),
        "bindfs": capture(["bindfs", "--version"]),
        "git_commit": capture(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"]),
        "workdir": str(workdir),
        "workdir_fstype": fstype,
        "workdir_same_device_as_repo": workdir.stat().st_dev == REPO_ROOT.stat().st_dev,
    }


def summarize(
    runs: list[dict[str, Any]], workloads: list[str], targets: list[str]
) -> list[dict[str, Any]]:
    rows = []
    for wl in workloads:
        medians = {}
        for t in targets:
            values = [r["value"] for r in runs if r["workload"] == wl and r["target"] == t]
            if values:
                medians[t] = statistics.median(values)
                rows.append(
                    {
                        "workload": wl,
                        "target": t,
                        "n": len(values),
                        "median": medians[t],
                        "min": min(values),
                        "max": max(values),
                        "unit": UNITS[wl],
                    }
                )
        for row in rows:
            if row["workload"] == wl:
                base = medians.get("native")
                row["ratio"] = row["median"] / base if base else None
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    def num(value: float, unit: str) -> str:
        return f"{value:.1f}" if unit == "MB/s" else f"{value:.0f}"

    header = ("workload", "target", "median", "min", "max", "unit", "ratio-to-native")
    body = [
        (
            r["workload"],
            r["target"],
            num(r["median"], r["unit"]),
            num(r["min"], r["unit"]),
            num(r["max"], r["unit"]),
            r["unit"],
            "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    numeric = {2, 3, 4, 6}

    def line(cells: tuple[str, ...]) -> str:
        parts = [
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return " | ".join(parts).rstrip()

    sep = "-+-".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in body)])


# --------------------------------------------------------------------------- driver


def parse_size(text: str) -> int:
    """fio-style sizes (K/M/G/T are powers of 1024), rounded down to whole MiB."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}, try 256M or 1G")
    power = " kmgt".index(m[2].lower() or " ")
    size = int(float(m[1]) * 1024**power) // MIB * MIB
    if size < MIB:
        raise argparse.ArgumentTypeError("size must be at least 1 MiB")
    return size


def csv_list(allowed: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}")
        return list(dict.fromkeys(items))

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--targets", type=csv_list(ALL_TARGETS), default=list(ALL_TARGETS))
    p.add_argument("--workloads", type=csv_list(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--size", type=parse_size, help="test file size (default 1G)")
    p.add_argument("--repeats", type=int, help="repeats per workload (default 3)")
    p.add_argument("--runtime", type=int, help="seconds per random-I/O run (default 10)")
    p.add_argument("--files", type=int, help="files in the smallfiles workload (default 2000)")
    p.add_argument("--workdir", type=Path, help="scratch dir (default: new dir in /var/tmp)")
    p.add_argument("--json", type=Path, default=BENCH_DIR / "results" / "latest.json")
    p.add_argument("--keep", action="store_true", help="keep the scratch data and logs")
    p.add_argument("--smoke", action="store_true", help="tiny sizes to check the harness works")
    args = p.parse_args(argv)
    preset = SMOKE if args.smoke else DEFAULTS
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repeats < 1 or args.runtime < 1 or args.files < 1:
        p.error("--repeats, --runtime and --files must be positive")
    if "native" not in args.targets:
        # Ratios are the point; a run without its own baseline cannot produce them.
        args.targets.insert(0, "native")
    return args


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Let cleanup finish even if the user presses Ctrl-C again."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Explicitly, because a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)

    own_workdir = args.workdir is None
    if own_workdir:
        args.workdir = Path(tempfile.mkdtemp(prefix="volfs-bench-", dir="/var/tmp"))
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)

    report: dict[str, Any] = {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "config": {
            "targets": args.targets,
            "workloads": args.workloads,
            "size_bytes": args.size,
            "repeats": args.repeats,
            "runtime_s": args.runtime,
            "files": args.files,
            "smoke": args.smoke,
        },
        "machine": machine_facts(args.workdir),
        "targets": {},
        "runs": [],
    }
    if not report["machine"]["workdir_same_device_as_repo"]:
        log(f"warning: {args.workdir} is not on the same device as {REPO_ROOT}")

    targets = {name: TARGET_CLASSES[name](args.workdir) for name in args.targets}
    made: list[Target] = []  # everything setup() was tried on, so teardown misses nothing
    live: list[Target] = []
    rc = 0
    try:
        for name, target in targets.items():
            made.append(target)
            try:
                target.setup()
            except TargetMissing as exc:
                log(f"{name}: missing: {exc}")
                report["targets"][name] = {"status": "missing", "reason": str(exc)}
                continue
            live.append(target)
            report["targets"][name] = {"status": "ok", "path": str(target.path)}

        log(f"warming up the disk with {args.size // MIB} MiB in {targets['native'].path}")
        report["warmup_s"] = warm_up_disk(targets["native"].path, args)

        for rep in range(args.repeats):
            # Rotate the order so slow drift over the run does not favour one target.
            order = live[rep % len(live) :] + live[: rep % len(live)]
            for target in order:
                if report["targets"][target.name]["status"] != "ok":
                    continue
                done = "nothing"
                try:
                    for workload, sample in target_pass(target, args):
                        unit = UNITS[workload]
                        log(
                            f"[{rep + 1}/{args.repeats}] {target.name:<6} {workload:<13} "
                            f"{sample['value']:12.1f} {unit}"
                        )
                        report["runs"].append(
                            {
                                "repeat": rep,
                                "target": target.name,
                                "workload": workload,
                                "unit": unit,
                                **sample,
                            }
                        )
                        done = workload
                except Exception as exc:  # a broken target must not stop the others
                    reason = f"{type(exc).__name__}: {exc}"
                    log(f"{target.name}: failed after {done} in repeat {rep + 1}: {reason}")
                    report["targets"][target.name] = {
                        "status": "failed",
                        "reason": reason,
                        "repeat": rep,
                        "daemon_log": target.diagnostics(),
                    }
                    rc = 1
                    with shielded():
                        target.teardown()
    except KeyboardInterrupt:
        log("interrupted, cleaning up")
        report["interrupted"] = True
        rc = 130
    except Exception as exc:  # still clean up, report and print what was measured
        log(f"error: {type(exc).__name__}: {exc}")
        report["error"] = f"{type(exc).__name__}: {exc}"
        rc = 1
    finally:
        with shielded():
            for target in reversed(made):
                try:
                    target.teardown()
                except Exception as exc:  # keep unmounting the rest
                    log(f"{target.name}: teardown error: {exc}")
            leftovers = mounts_under(args.workdir)
            for path in leftovers:
                force_unmount(path, args.workdir / "logs" / "cleanup.log")
            leftovers = mounts_under(args.workdir)
            if leftovers:
                log(f"ERROR: still mounted: {', '.join(map(str, leftovers))}")
                report["leftover_mounts"] = [str(p) for p in leftovers]
                rc = 2
            elif not args.keep:
                if own_workdir:
                    shutil.rmtree(args.workdir, ignore_errors=True)
                else:
                    for sub in ("native", "store", "bindfs-src", "mnt-volfs", "mnt-bindfs", "logs"):
                        shutil.rmtree(args.workdir / sub, ignore_errors=True)

            report["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            report["summary"] = summarize(report["runs"], args.workloads, args.targets)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")

    print(format_table(report["summary"]) if report["summary"] else "no results")
    for name in args.targets:
        info = report["targets"].get(name, {"status": "not run", "reason": "interrupted"})
        if info["status"] != "ok":
            reason = info["reason"].replace("\n", "\n    ")
            print(f"{name}: {info['status']}: {reason}")
    print(f"raw results: {args.json}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
