"""Export and import throughput as a ratio to GNU tar of a native directory on the same disk.

    .venv/bin/python bench/export_import.py [--dir DIR] [--mb 400]

Makes a tree of mixed files (large, medium, 16 KiB, and sparse ones) under DIR, then times,
best of --runs, each with its output fsynced:

* ``tar -cf`` of the tree vs ``volfsd export`` of a volume holding the same tree;
* ``tar -xf`` of that archive into a directory vs ``volfsd import`` of it into a new volume;
* ``volfsd import`` of the directory itself (no tar).

Page caches are warm for both sides alike (each input was just written or read).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOLFSD = [sys.executable, "-m", "volfs"]


def make_tree(top: Path, megabytes: int) -> int:
    """Files of mixed sizes, about *megabytes* MB of data in all; returns the bytes written."""
    budget, written, n = megabytes << 20, 0, 0
    sizes = [8 << 20, 1 << 20, 256 << 10, 16 << 10, 16 << 10, 16 << 10, 4 << 10]
    while written < budget:
        size = sizes[n % len(sizes)]
        sub = top / f"d{n % 50:02d}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{n:06d}").write_bytes(os.urandom(size))
        written += size
        n += 1
    for i in range(8):  # 64 MiB files holding 1 MiB of data
        with open(top / f"sparse{i}", "wb") as f:
            f.seek(32 << 20)
            f.write(os.urandom(1 << 20))
            f.truncate(64 << 20)
        written += 1 << 20
    return written


def timed(argv: list[str], env: dict[str, str], runs: int, before=None) -> float:
    best = float("inf")
    for _ in range(runs):
        if before is not None:
            before()
        start = time.perf_counter()
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/var/tmp", help="where to work (the disk measured)")
    parser.add_argument("--mb", type=int, default=400)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="volfs-bench-", dir=args.dir))
    env = {**os.environ, "VOLFS_ROOT": str(work / "store")}
    try:
        tree = work / "tree"
        tree.mkdir()
        data = make_tree(tree, args.mb)
        native_tar, out = work / "native.tar", work / "out"

        def fresh_out() -> None:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()

        def no_volume(name: str):
            return lambda: subprocess.run([*VOLFSD, "rm", name], env=env, capture_output=True)

        sh = ["sh", "-c"]
        results = {
            "tar -c (native)": timed(
                [*sh, f"tar -cf {native_tar} -C {tree} . && sync {native_tar}"], env, args.runs
            ),
            "import DIR": timed(
                [*VOLFSD, "import", "v", str(tree)], env, args.runs, no_volume("v")
            ),
            "export": timed([*VOLFSD, "export", "v", "-o", str(work / "v.tar")], env, args.runs),
            "tar -x (native)": timed(
                [*sh, f"tar -xf {native_tar} -C {out} && sync -f {out}"], env, args.runs, fresh_out
            ),
            "import TAR": timed(
                [*VOLFSD, "import", "w", str(native_tar)], env, args.runs, no_volume("w")
            ),
        }
        mb = data / 1e6
        for what, seconds in results.items():
            print(f"{what:18s} {seconds:6.2f} s  {mb / seconds:7.1f} MB/s")
        print(f"export / tar -c: {results['tar -c (native)'] / results['export']:.2f}x the speed")
        print(f"import TAR / tar -x: {results['tar -x (native)'] / results['import TAR']:.2f}x")
        print(f"import DIR / tar -x: {results['tar -x (native)'] / results['import DIR']:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
