"""How volfs's costs grow with the number of files a volume holds (part of bench/run.py).

One volume is filled in steps (10k, then 100k, then 1M files by default: empty
files, 1000 per directory, created through the mount by one process per core).
At each size, `repeats` times:

1. clean unmount (`volfsd umount`, then wait until the worker has let go of
   the volume's lock), sync and drop caches;
2. time `volfsd mount` from its start until the mount point is live: the
   start-up cost of a volume of that size, store read from disk;
3. stat `ops` files of the volume picked at random (cold: new mount, empty
   kernel caches), then the same files again (warm);
4. the small-file cycle of bench/workloads.py on `ops` new files;
5. read VmHWM (peak resident memory) of the serving process, whose pid is
   the first word of STORE/volumes/NAME/lock.

The daemon runs throughout, so a mount does not include starting it.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import workloads
from targets import VolfsTarget

KIB = 1024


def parse_count(text: str) -> int:
    """10000, 10k, 1M: k and M are powers of 1000 here (these are file counts)."""
    text = text.strip().lower()
    factor = {"k": 1000, "m": 1_000_000}.get(text[-1:], 1)
    digits = text[:-1] if factor > 1 else text
    count = int(float(digits) * factor)
    if count < 1:
        raise ValueError(f"bad file count {text!r}")
    return count


def label(count: int) -> str:
    for factor, suffix in ((1_000_000, "M"), (1000, "k")):
        if count >= factor and count % factor == 0:
            return f"{count // factor}{suffix}"
    return str(count)


def vm_status(pid: int | None) -> dict[str, int]:
    """VmHWM and VmRSS of a process in KiB ({} if it is gone)."""
    if pid is None:
        return {}
    out = {}
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    out[key] = int(rest.split()[0])
    except OSError:
        return {}
    return out


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_scale(
    target: VolfsTarget,
    sizes: list[int],
    cfg: argparse.Namespace,
    log: Callable[[str], None],
    results: list[dict[str, Any]],
) -> None:
    """Fill target's volume step by step and measure at each size; one record per size.

    setup() mounts the target, unmount() unmounts it and leaves its daemon
    running; the caller's teardown() also stops the daemon.
    Records are appended to results as they are made, so a failure keeps
    what was measured before it.
    """
    target.setup()
    root = target.path / "pop"
    populated = 0
    for size in sorted(set(sizes)):
        log(f"scale: filling the volume to {size} files")
        seconds = workloads.populate_tree(root, populated, size, cfg.workers)
        added = size - populated
        populated = size
        record: dict[str, Any] = {
            "files": size,
            "populate_s": seconds,
            "populate_files_per_s": added / seconds if added else None,
            "repeats": [],
        }
        results.append(record)
        picked = random.Random(size).sample(range(size), min(cfg.scale_ops, size))
        paths = [workloads.tree_path(root, i) for i in picked]
        for rep in range(cfg.repeats):
            if not target.unmount() or not target.wait_released():
                raise RuntimeError(f"could not unmount {target.mountpoint} cleanly")
            dropped = workloads.drop_caches()
            t0 = time.perf_counter()
            target.setup()
            mount_s = time.perf_counter() - t0
            pid = target.worker_pid()
            at_mount = vm_status(pid)
            cold = workloads.stat_paths(paths)
            warm = workloads.stat_paths(paths)
            cycle = workloads.smallfiles(target.path / "cycle", len(paths))
            at_end = vm_status(pid)
            sample = {
                "mount_s": mount_s,
                "caches_dropped": dropped,
                "worker_pid": pid,
                "stat_cold_us": cold["us_per_op"],
                "stat_warm_us": warm["us_per_op"],
                "cycle": cycle,
                "vmhwm_after_mount_kib": at_mount.get("VmHWM"),
                "vmhwm_kib": at_end.get("VmHWM"),
                "vmrss_kib": at_end.get("VmRSS"),
            }
            record["repeats"].append(sample)
            log(
                f"scale [{rep + 1}/{cfg.repeats}] {label(size):>5}: mount {mount_s:.2f} s, "
                f"stat cold {cold['us_per_op']:.0f} us, cycle {cycle['cycle_us']:.0f} us/file, "
                f"VmHWM {(at_end.get('VmHWM') or 0) / KIB:.0f} MiB"
            )
        record["store_bytes"] = tree_bytes(target.store / "volumes" / target.volume)
        record.update(summarize_size(record["repeats"]))


METRICS = (
    # key, row label, digits
    ("mount_s", "mount (start-up) s", 2),
    ("stat_cold_us", "stat, cold, us/op", 1),
    ("stat_warm_us", "stat, warm, us/op", 1),
    ("create_us", "create+write 4K us/op", 1),
    ("stat_us", "stat new file us/op", 1),
    ("read_us", "read 4K us/op", 1),
    ("unlink_us", "unlink us/op", 1),
    ("cycle_us", "whole cycle us/file", 1),
    ("peak_rss_mib", "peak RSS MiB", 0),
)


def summarize_size(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repeats (min and max alongside); peak RSS is the highest seen."""
    columns: dict[str, list[float]] = {}
    for r in repeats:
        flat = {
            "mount_s": r["mount_s"],
            "stat_cold_us": r["stat_cold_us"],
            "stat_warm_us": r["stat_warm_us"],
            **{k: r["cycle"][k] for k in ("create_us", "stat_us", "read_us", "unlink_us")},
            "cycle_us": r["cycle"]["cycle_us"],
        }
        for key, value in flat.items():
            columns.setdefault(key, []).append(value)
    out: dict[str, Any] = {
        key: {"median": statistics.median(v), "min": min(v), "max": max(v)}
        for key, v in columns.items()
    }
    peaks = [r["vmhwm_kib"] for r in repeats if r.get("vmhwm_kib")]
    out["peak_rss_mib"] = {"median": max(peaks) / KIB} if peaks else None
    return out


def text_table(header: tuple[str, ...], body: list[tuple[str, ...]], left: int = 1) -> str:
    """Pipe-separated columns; the first `left` columns flush left, the rest right."""
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        parts = [
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return " | ".join(parts).rstrip()

    sep = "-+-".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in body)])


def format_scale(results: list[dict[str, Any]]) -> str:
    """One row per metric, one column per size: median (ratio to the smallest size)."""
    done = [r for r in results if r.get("mount_s")]
    if not done:
        return "no scale results"
    base = done[0]
    header = ("volfs, files in volume", *(label(r["files"]) for r in done))
    body = []
    for key, name, digits in METRICS:
        cells = []
        for r in done:
            value = (r.get(key) or {}).get("median")
            ref = (base.get(key) or {}).get("median")
            if value is None:
                cells.append("n/a")
            elif r is base or not ref:
                cells.append(f"{value:.{digits}f}")
            else:
                cells.append(f"{value:.{digits}f} ({value / ref:.2f}x)")
        body.append((name, *cells))
    body.append(
        ("fill rate files/s", *(f"{r['populate_files_per_s'] or 0:.0f}" for r in done)),
    )
    title = f"(median of {len(base['repeats'])}; in brackets: ratio to {label(base['files'])})"
    return f"{text_table(header, body)}\n{title}"
