"""Finding the workers an earlier daemon started, so that a new daemon can adopt them.

Workers outlive their daemon.  A daemon that starts finds them by their control sockets in
``RUN_DIR/workers/`` (workerctl.py) and asks each for its status; a worker that serves a
volume but has no socket (a volfs from before workers had one) is found by the volume's lock.
Each becomes a :class:`Served` record, with the binds of its mount that are there as its
paths, that the supervisor watches from then on.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from volfs import mounts, requests, workerctl
from volfs.errors import VolfsError
from volfs.served import MountPath, Served
from volfs.store.root import StoreRoot
from volfs.store.snapshots import check_target
from volfs.workerctl import WorkerProcess

log = logging.getLogger(__name__)


async def running_workers(root: StoreRoot, run_dir: Path) -> list[Served]:
    """The volumes of *root* served by workers that answer on their sockets in *run_dir*,
    and those whose worker does not answer but holds the volume (see :func:`silent_worker`).
    Stale sockets are removed; sockets of another store are left alone."""
    found = []
    for sock in sorted((run_dir / workerctl.WORKERS_DIR).glob("*.sock")):
        name = sock.name.removesuffix(".sock")
        try:
            check_target(name)
            status = await workerctl.call(sock, requests.WorkerStatusRequest())
        except VolfsError:
            continue
        except workerctl.WorkerUnreachable as exc:
            if not root.is_served(name):
                log.info("removing the stale worker socket %s", sock)
                with contextlib.suppress(OSError):
                    sock.unlink()
            else:
                log.warning("volume %s: its worker does not answer (%s)", name, exc,
                            extra={"volume": name})  # fmt: skip
                served = silent_worker(root, run_dir, name)
                if served is not None:
                    found.append(served)
            continue
        if status.get("root") != str(root.path) or status.get("name") != name:
            log.warning("worker socket %s belongs to another store; left alone", sock)
            continue
        served = _answering_worker(name, status)
        if served is not None:
            _find_paths(served)
            log.info("volume %s: adopted its worker (pid %d) and its paths %s", name,
                     status["pid"], ", ".join(map(str, served.paths)) or "(none)",
                     extra={"volume": name})  # fmt: skip
            found.append(served)
    return found


def _find_paths(served: Served) -> None:
    """Give *served* the binds of its mount that are there as its paths."""
    if served.device:
        for entry in mounts.mount_table():
            path = Path(entry.mountpoint)
            if entry.device == served.device and path != served.staging:
                served.paths[path] = MountPath(path, entry.read_only)


def _answering_worker(name: str, status: dict[str, object]) -> Served | None:
    try:
        worker = WorkerProcess(int(str(status["pid"])), child=False)
    except (ProcessLookupError, KeyError, TypeError, ValueError):
        return None
    served = Served(name, Path(str(status.get("mountpoint"))), worker=worker,
                    device=str(status.get("device", "")), adopted=True)  # fmt: skip
    if status.get("protocol") != workerctl.PROTOCOL:
        served.status = "needs-remount"
        served.problems.append(
            f"its worker (pid {worker.pid}) is of volfs {status.get('version')}: "
            "unmount and mount the volume again to update it"
        )
    else:
        served.status = "mounted"
    return served


def silent_worker(root: StoreRoot, run_dir: Path, name: str) -> Served | None:
    """The worker that serves *name* but answers no control socket (a volfs from before
    workers had one), found by the pid in the volume's lock: it goes on serving, and
    `status` says it needs a remount.  None if no such process is there."""
    try:
        pid = int((root.volume_path(name) / "lock").read_text().split()[0])
        worker = WorkerProcess(pid, child=False)
    except (OSError, ValueError, IndexError, ProcessLookupError):
        return None
    staging = run_dir / "staging" / name
    entry = mounts.find_mount(staging)
    device = entry.device if entry is not None and entry.fstype == mounts.FSTYPE else ""
    served = Served(name, staging, worker=worker, device=device, adopted=True,
                    status="needs-remount")  # fmt: skip
    served.problems.append(
        f"its worker (pid {pid}) has no control socket (an older volfs?): unmount the "
        "volume and mount it again to update it"
    )
    _find_paths(served)
    log.warning("volume %s: adopted a worker that needs a remount (pid %d)", name, pid,
                extra={"volume": name})  # fmt: skip
    return served
