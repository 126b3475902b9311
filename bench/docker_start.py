"""What a volfs volume adds to starting a container, against Docker's own local volumes.

Run as root: ``.venv/bin/python bench/docker_start.py [--runs 9]``.  It starts a private
Docker engine (tests/docker_engine.py: no network, a busybox image) and a volfs daemon of its
own serving the plugin, then times ``docker run --rm -v VOLUME:/p IMAGE sh -c 'echo x >
/p/f'`` for a volume of Docker's ``local`` driver, a volfs volume through the plugin (its
worker starts with each run, since the last container's Unmount ends it), the same with a
container holding the volume meanwhile (the volume stays mounted: only the claim), and a bind
of a path where volfs has the volume mounted.  Medians, and ratios to the local driver; the
machine is shared and noisy, so compare ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from docker_engine import DockerEngine  # noqa: E402


def timed(engine: DockerEngine, runs: int, *volume: str) -> float:
    """The median seconds of *runs* container runs with *volume* arguments."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        engine.run(*volume, engine.image, "sh", "-c", "echo x > /p/f")
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("docker_start.py: run as root (Docker, bind mounts)", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="volfs-docker-bench-"))
    driver = f"volfs-bench-{os.getpid()}"
    env = {**os.environ, "VOLFS_ROOT": str(base / "store"), "VOLFS_RUN_DIR": str(base / "run")}
    volfsd = [sys.executable, "-m", "volfs"]
    engine = DockerEngine(base / "docker")
    daemon = None
    try:
        engine.start()
        daemon = subprocess.Popen([*volfsd, "serve", "--docker-plugin", driver], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 30
        while not Path(f"/run/docker/plugins/{driver}.sock").exists():
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise RuntimeError("volfsd serve did not start")
            time.sleep(0.05)
        engine.docker("volume", "create", "local-vol")
        engine.docker("volume", "create", "-d", driver, "volfs-vol")
        subprocess.run([*volfsd, "mount", "bound", str(base / "bound")], env=env, check=True)
        results = {"local driver": timed(engine, args.runs, "-v", "local-vol:/p")}
        results["volfs driver"] = timed(engine, args.runs, "-v", "volfs-vol:/p")
        holder = engine.run_container("-v", "volfs-vol:/p", engine.image, "sleep", "600")
        results["volfs driver, volume held"] = timed(engine, args.runs, "-v", "volfs-vol:/p")
        engine.docker("rm", "-f", holder)
        results["bind of a volfs path"] = timed(engine, args.runs, "-v", f"{base / 'bound'}:/p")
        local = results["local driver"]
        print(f"docker run --rm, median of {args.runs}:")
        for what, seconds in results.items():
            print(f"  {what:28s} {seconds * 1000:7.0f} ms  {seconds / local:5.2f}x local")
        return 0
    finally:
        try:
            engine.stop()
        finally:
            if daemon is not None:
                subprocess.run([*volfsd, "umount", "--all"], env=env, capture_output=True)
                daemon.terminate()
                daemon.wait(timeout=60)
            subprocess.run(["rm", "-rf", str(base)], check=False)


if __name__ == "__main__":
    sys.exit(main())
