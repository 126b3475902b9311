"""What the daemon knows of a volume it serves, and the bind mounts of its paths.

A volume is served by one worker whose FUSE mount sits at a *staging* path in the daemon's
runtime directory; each path a user asked for is a bind of that mount (the model Kubernetes
CSI uses), so all paths are one file system.  Binds are made on descriptors (mountpoint.py,
sysmount.py), never on path strings that a container could have redirected.

When a worker dies its binds stay where they are, dead: writers through them get ENOTCONN
instead of writing into the directory under the mount.  The new worker's mount is then
attached *beneath* each dead bind and the dead one detached above it, so the directory under
a mount point is never exposed while a volume heals.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from volfs import mounts, sysmount
from volfs.catalog import LOCAL_ENGINE
from volfs.errors import VolfsError
from volfs.mountpoint import PRESENT, REPLACE, MountPoint, bind, open_mountpoint, prepare
from volfs.workerctl import WorkerProcess

log = logging.getLogger(__name__)

#: States of a mount path.
MOUNTED = "mounted"
DEAD = "dead"  #: the worker is gone; the path holds its dead mount until the new one is in
REFUSED = "refused"  #: the mount point changed (a symlink, not empty, gone): not mounted there


@dataclass
class MountPath:
    path: Path
    read_only: bool
    state: str = MOUNTED
    problem: str = ""  #: why it is REFUSED

    def describe(self) -> dict[str, object]:
        state = f"{self.state}: {self.problem}" if self.problem else self.state
        return {"path": str(self.path), "read_only": self.read_only, "state": state}


@dataclass
class Served:
    """A volume this daemon serves: its worker, staging mount and user mount points."""

    name: str
    staging: Path
    paths: dict[Path, MountPath] = field(default_factory=dict)
    worker: WorkerProcess | None = None
    device: str = ""  #: "major:minor" of the worker's FUSE mount (all binds share it)
    #: mounted, healing, down (no worker and none could be started), needs-remount
    status: str = "starting"
    stopping: bool = False
    restarts: int = 0
    adopted: bool = False  #: the worker was started by an earlier daemon
    problems: list[str] = field(default_factory=list)
    #: The engine that holds it (`volfs.engines`): "local", or a cluster engine's name.
    engine: str = LOCAL_ENGINE

    @property
    def read_only(self) -> list[Path]:
        return sorted(p.path for p in self.paths.values() if p.read_only)

    def open_staging(self) -> MountPoint:
        """The staging mount, checked to be the live FUSE mount of this volume's worker: a
        bind of anything else (a bare directory, another mount) would put users' writes
        into the runtime directory."""
        source = open_mountpoint(self.staging)
        top = source.top()
        if top is None or top.fstype != mounts.FSTYPE or top.device != self.device:
            source.close()
            found = f"{top.fstype} {top.device}" if top else "no mount"
            raise VolfsError(
                f"volume {self.name}: its staging mount {self.staging} is not the worker's "
                f"({found}, expected {self.device}): not binding it"
            )
        return source

    def bind_path(self, mount_path: MountPath, create: bool) -> None:
        """Bind the volume at *mount_path*: on an empty directory, or beneath a dead mount of
        the volume (which is then detached).  Directories are made only if *create*."""
        with open_mountpoint(mount_path.path, create=create) as target:
            how = prepare(target, self.name, self.device)
            if how != PRESENT:
                with self.open_staging() as source:
                    bind(source, target, mount_path.read_only, beneath=how == REPLACE)
                if how == REPLACE:
                    sysmount.detach(target.fd)  # the dead mount, now above the new one
        mount_path.state, mount_path.problem = MOUNTED, ""

    def rebind(self, mount_path: MountPath) -> None:
        """Bind *mount_path* again after a heal; a mount point that changed meanwhile is
        refused (and logged), never followed or created."""
        try:
            self.bind_path(mount_path, create=False)
        except (VolfsError, OSError) as exc:
            mount_path.state, mount_path.problem = REFUSED, str(exc)
            log.error("volume %s: not mounted at %s again: %s", self.name, mount_path.path, exc,
                      extra={"volume": self.name})  # fmt: skip

    def owns(self, target: MountPoint) -> bool:
        """Whether the mount on *target* is one of this volume's (live or dead)."""
        top = target.top()
        if top is None or top.fstype != mounts.FSTYPE:
            return False
        return top.device == self.device or (top.source == self.name and target.is_dead())

    def describe(self, more_problems: Sequence[str] = ()) -> dict[str, object]:
        """What `status` shows of the volume; *more_problems*: what the supervisor knows."""
        return {
            "name": self.name,
            "status": self.status,
            "worker_pid": self.worker.pid if self.worker is not None else None,
            "restarts": self.restarts,
            "adopted": self.adopted,
            "mounts": [p.describe() for p in sorted(self.paths.values(), key=lambda p: p.path)],
            "problems": [*self.problems, *(f"{p.path}: {p.problem}" for p in self.paths.values()
                                           if p.problem), *more_problems],
        }  # fmt: skip
