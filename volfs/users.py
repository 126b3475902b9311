"""Who uses a mounted volume: processes with files, directories or maps on it, and mount
namespaces (containers) that hold a mount of it.

Read from /proc only, never through the mount itself: a stat of a file on a FUSE mount is a
request to its worker, which may be dead or the very process asking.  A process's open files
are matched by the mount id in ``/proc/PID/fdinfo/N`` against the ids its *own* mount
namespace gives the volume's mounts (ids differ between namespaces); its cwd and root by
``/proc/PID/mountinfo`` and the link text of ``cwd``/``root``; its maps by the device in
``/proc/PID/maps``.  A process may end at any moment of the scan: whatever vanishes is skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from volfs import mounts

_PROC = Path("/proc")


@dataclass(frozen=True)
class User:
    pid: int
    command: str
    what: str  #: "open file", "cwd", "root", "memory map" or "mount namespace"
    container: str = ""  #: a Docker container id (12 hex digits), when one is visible

    def describe(self) -> str:
        who = f"pid {self.pid} ({self.command}, {self.what})"
        return f"container {self.container} ({who})" if self.container else who


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _namespace(pid: str) -> str | None:
    try:
        return os.readlink(_PROC / pid / "ns" / "mnt")
    except OSError:
        return None


def _volume_mounts(pid: str, device: str) -> list[mounts.MountEntry] | None:
    """The mounts of *device* in the mount namespace of *pid* (None if it is gone)."""
    text = _read(_PROC / pid / "mountinfo")
    if text is None:
        return None
    return [e for e in mounts.parse_mountinfo(text) if e.device == device]


def _container(pid: str) -> str:
    text = _read(_PROC / pid / "cgroup") or ""
    for part in text.replace("/", " ").replace("-", " ").replace(".", " ").split():
        if len(part) == 64 and all(c in "0123456789abcdef" for c in part):
            return part[:12]
    return ""


def _command(pid: str) -> str:
    return (_read(_PROC / pid / "comm") or "?").strip()


def _use(pid: str, device: str, on_volume: list[mounts.MountEntry]) -> str | None:
    """How process *pid* uses the volume whose mounts in its namespace are *on_volume*."""
    ids = {e.mount_id for e in on_volume}
    fd_dir = _PROC / pid / "fdinfo"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        fds = []
    for fd in fds:
        text = _read(fd_dir / fd) or ""
        for line in text.splitlines():
            if line.startswith("mnt_id:") and int(line.split()[1]) in ids:
                return "open file"
    for link in ("cwd", "root"):
        try:
            target = os.readlink(_PROC / pid / link)
        except OSError:
            continue
        if any(_under(target, e.mountpoint) for e in on_volume):
            return link
    major, minor = (int(n) for n in device.split(":"))
    wanted = f"{major:02x}:{minor:02x}"
    for line in (_read(_PROC / pid / "maps") or "").splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[3] == wanted:
            return "memory map"
    return None


def _under(path: str, mountpoint: str) -> bool:
    return path == mountpoint or path.startswith(mountpoint.rstrip("/") + "/")


def users_of(device: str, exclude: set[int] | frozenset[int] = frozenset()) -> list[User]:
    """Every process that uses the FUSE mount with *device* ("major:minor"), and one entry
    per other mount namespace that holds a mount of it without such a process."""
    ours = _namespace("self")
    found: list[User] = []
    holders: dict[str, str] = {}  #: other namespaces holding a mount of it -> lowest pid
    cache: dict[str, list[mounts.MountEntry]] = {}
    pids = sorted((p for p in os.listdir(_PROC) if p.isdigit()), key=int)
    for pid in pids:
        if int(pid) in exclude or int(pid) == os.getpid():
            continue
        namespace = _namespace(pid)
        if namespace is None:
            continue
        if namespace not in cache:
            on_volume = _volume_mounts(pid, device)
            if on_volume is None:
                continue
            cache[namespace] = on_volume
        on_volume = cache[namespace]
        if not on_volume:
            continue
        if namespace != ours:
            holders.setdefault(namespace, pid)
        what = _use(pid, device, on_volume)
        if what is not None:
            found.append(User(int(pid), _command(pid), what, _container(pid)))
    busy = {_namespace(str(u.pid)) for u in found}
    for namespace, pid in holders.items():
        if namespace not in busy:
            found.append(User(int(pid), _command(pid), "mount namespace", _container(pid)))
    return found


def describe_users(users: list[User], most: int = 3) -> str:
    """One short line naming the first *most* users."""
    text = ", ".join(u.describe() for u in users[:most])
    if len(users) > most:
        text += f" and {len(users) - most} more"
    return text
