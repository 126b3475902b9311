"""Starting a mount worker for the supervisor, and waiting until its mount is live.

The worker (worker.py) runs in a session of its own so that it outlives the daemon; it reports
``ok DEVICE`` (or ``error: TEXT``) on a pipe once its mount is live or has failed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

import trio

from volfs import logs, mounts, sysmount
from volfs.errors import VolfsError
from volfs.mountpoint import open_mountpoint
from volfs.served import Served
from volfs.store.root import StoreRoot
from volfs.workerctl import WorkerProcess

#: How long a new worker may take to load its volume and mount it.
READY_TIMEOUT = 60.0


async def start_worker(
    root: StoreRoot, run_dir: Path, served: Served, bind: bool, engine_url: str | None = None
) -> None:
    """Start the worker of *served* at its staging path (*bind*) or its one path, and wait
    until it serves; *served* then has the new worker and device, its problems cleared.
    With *engine_url*, the worker serves the volume of that cluster engine; the URL (it may
    hold a password) reaches it on a pipe, never on its command line.

    Raises VolfsError with the worker's own one line if it could not mount.
    """
    _clear_staging(served, bind)
    log_name = f"{served.name}.log"
    ready_r, ready_w = os.pipe()
    args = [sys.executable, "-m", "volfs.worker", "--root", str(root.path),
            "--name", served.name, "--mountpoint", str(served.staging),
            "--ready-fd", str(ready_w), "--run-dir", str(run_dir), *logs.worker_args()]  # fmt: skip
    keep = [ready_w]
    if engine_url is not None:
        url_r, url_w = os.pipe()
        os.write(url_w, engine_url.encode())  # far below a pipe's buffer: never blocks
        os.close(url_w)
        keep.append(url_r)
        args += ["--engine-url-fd", str(url_r)]
    try:
        with root.open_log(log_name) as log_file:
            process = WorkerProcess.spawn(args, log_file.fileno(), *keep)
    finally:
        for fd in keep:
            os.close(fd)
    text = await _ready_line(ready_r)
    if text.split(" ")[0] != "ok":
        process.send_signal(signal.SIGKILL)
        await process.wait()
        reason = text.removeprefix("error: ") or (
            f"the mount worker exited early; see {root.log_path(log_name)}"
        )
        raise VolfsError(reason)
    served.worker = process
    served.device = text.removeprefix("ok").strip()
    served.status = "mounted"
    served.adopted = False
    served.problems.clear()  # a failed restart or an old worker: behind us with this one


def _clear_staging(served: Served, bind: bool) -> None:
    """Make the worker's mount point ready: no dead mount a worker that died left there."""
    if not bind:
        mounts.detach(served.staging, lazy=True)  # a dead mount of ours, if any
        return
    for directory in (served.staging.parent, served.staging):
        # Not Path.mkdir(exist_ok=True): its stat of a dead mount fails (ENOTCONN).
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, 0o700)
    with open_mountpoint(served.staging) as staging:
        if staging.top() is not None:
            sysmount.detach(staging.fd)  # left by a worker that died


async def _ready_line(ready_r: int) -> str:
    """The worker's one line on the ready pipe (empty if it exited or took too long)."""
    stream = trio.lowlevel.FdStream(ready_r)
    reply = b""
    with trio.move_on_after(READY_TIMEOUT):
        while not reply.endswith(b"\n"):
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            reply += chunk
    await stream.aclose()
    return reply.decode(errors="replace").strip()
