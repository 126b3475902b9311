"""Who uses a mount: the processes (and containers) that keep a volfs mount busy or alive.

`users_of(device)` scans /proc for every process that has something on the mount whose device
is *device* ("major:minor", as in field 3 of /proc/PID/mountinfo): an open file, its working or
root directory, a memory-mapped file, and mount namespaces other than ours that hold a mount of
it at all (a container it was bound into: that keeps the file system alive after the host's
mount is gone, with no file open).

Nothing here calls into the file system it looks at, so a hung or dead volfs server cannot make
it hang: no stat() of a path on the mount, and none of /proc/PID/fd/N or /proc/PID/cwd either,
since stat follows those links to the file and asks its file system for attributes (a FUSE
GETATTR once the attribute cache has expired).  Instead:

* open files: /proc/PID/fdinfo/N names the file's mount (``mnt_id:``);
* working and root directories: /proc/PID/cwd and /proc/PID/root opened with ``O_PATH``, whose
  fdinfo names the mount.  The kernel resolves those links to the directory it holds (no lookup),
  and an ``O_PATH`` open neither checks permissions on the file nor opens it, so the file system
  is not asked anything (FUSE has no ``d_weak_revalidate``, the one hook such a walk could call);
* mapped files: /proc/PID/maps gives each mapping's device, in hex;
* mounts: /proc/PID/mountinfo, read once per mount namespace.

Mount ids are unique system-wide, but each namespace's copy of a mount has an id of its own, so
an fd's mount is matched against the ids that every namespace gives the device (an fd can be
passed to a process of another namespace).  The one wait left is the kernel's: reading
/proc/PID/maps takes the process's mmap lock, which a thread stuck in a page fault on a hung
mount can hold (shared, so only if another of its threads then waits to map something).

Processes come and go during a scan; whatever vanishes (or cannot be read) is skipped, never
raised.  Threads are taken to share their process's files and directories (so is nearly always
the case; a thread that unshared its working directory is not seen).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from volfs import mounts, sysmount

#: What a process has on the mount.
FD, CWD, ROOT, MMAP, NAMESPACE = "fd", "cwd", "root", "mmap", "mount-namespace"
_WORDS = {FD: "open file", CWD: "working directory", ROOT: "root directory", MMAP: "mapped file"}
#: Entries `describe_users` names before it says "and N more".
SHOWN = 3
#: fd targets that are never files on a mount (no fdinfo read needed for them).
_PSEUDO = ("socket:[", "pipe:[", "anon_inode:")
#: A container's id in a cgroup path: docker-ID.scope (systemd driver), /docker/ID (cgroupfs),
#: libpod-ID.scope (podman), cri-containerd-ID.scope, crio-ID.scope, /kubepods/.../ID.
_CONTAINER = re.compile(r"(?:^|[/\-])([0-9a-f]{64})(?:\.scope)?(?=/|$)")


class User(NamedTuple):
    pid: int
    command: str  #: /proc/PID/comm
    what: str  #: FD, CWD, ROOT, MMAP or NAMESPACE
    container: str | None  #: short (12 hex digits) container id, if its cgroup names one


def users_of(
    device: str,
    exclude_pids: Iterable[int] = (),
    through: set[int] | None = None,
    propagated: bool = True,
) -> list[User]:
    """Every use of the mount(s) of *device* ("major:minor") by processes not in
    *exclude_pids*, ordered by pid: one `User` per process and kind of use, and one per mount
    namespace other than ours that holds a mount of the device while none of its processes
    uses it otherwise (named by its lowest pid).

    With *through* (mount ids of our namespace: one bind of several), only files and
    directories opened through those mounts count, and no namespace does; maps name no mount,
    so they count whatever mount they came through.  With *propagated* False, a namespace
    whose mounts of the device are all slaves (copies propagation made, as in a systemd
    service's private namespace; a container's binds are private) does not count."""
    major, minor = (int(part) for part in device.split(":"))
    excluded = set(exclude_pids)
    ours = _namespace("self")
    pids = sorted(p for p in _pids() if p not in excluded)
    namespace_of = {pid: _namespace(pid) for pid in pids}
    namespaces: dict[str, list[int]] = {}  # namespace -> its pids, lowest first
    for pid in pids:
        if (namespace := namespace_of[pid]) is not None:
            namespaces.setdefault(namespace, []).append(pid)
    # The ids of the device's mounts, per namespace (read from the first process of each that
    # lets us: one may exit meanwhile, the next one then answers).
    holding: set[str] = set()
    mount_ids: set[int] = set()
    for ns, members in namespaces.items() if through is None else ():
        for pid in members:
            copies = _device_mounts(pid, device)
            if copies is not None:
                mount_ids |= {e.mount_id for e in copies}
                if any(propagated or not e.propagated for e in copies):
                    holding.add(ns)
                break
    if through is not None:
        mount_ids = through
    found: list[User] = []
    using: set[str] = set()  # namespaces with a process that uses the mount itself
    for pid in pids:
        uses = list(_uses(pid, mount_ids, major, minor))
        if not uses:
            continue
        command, container = _command(pid), _container(pid)
        found.extend(User(pid, command, what, container) for what in uses)
        if (namespace := namespace_of[pid]) is not None:
            using.add(namespace)
    for ns in sorted(holding - using - {ours}):
        pid = namespaces[ns][0]
        if os.path.isdir(f"/proc/{pid}"):  # still there: it names the namespace
            found.append(User(pid, _command(pid), NAMESPACE, _container(pid)))
    return sorted(found, key=lambda u: (u.pid, u.what))


def describe_users(users: list[User], shown: int = SHOWN) -> str:
    """One short line naming *users* by process, e.g. "pid 123 (sqlite3, open file),
    container 3f2a1b9c0d1e (pid 456, sh)"; past *shown* processes, "and N more".  "" if none."""
    by_pid: dict[int, list[User]] = {}
    for user in users:
        by_pid.setdefault(user.pid, []).append(user)
    parts = []
    for pid, entries in sorted(by_pid.items()):
        first = entries[0]
        uses = [_WORDS[u.what] for u in entries if u.what in _WORDS]
        details = ", ".join([first.command, *uses])
        if first.container is not None:
            parts.append(f"container {first.container} (pid {pid}, {details})")
        elif uses:
            parts.append(f"pid {pid} ({details})")
        else:
            parts.append(f"the mount namespace of pid {pid} ({first.command})")
    if len(parts) > shown:
        parts[shown:] = [f"and {len(parts) - shown} more"]
    return ", ".join(parts)


def container_id(cgroup: str) -> str | None:
    """The short id of the container a /proc/PID/cgroup text names, if it names one."""
    for line in cgroup.splitlines():
        path = line.split(":", 2)[-1]
        matches = _CONTAINER.findall(path)
        if matches:
            return str(matches[-1])[:12]
    return None


# -- /proc, each read allowed to fail (the process may be gone) ---------------------------------


def _pids() -> Iterator[int]:
    with os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit():
                yield int(entry.name)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _namespace(pid: int | str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _command(pid: int) -> str:
    return (_read(f"/proc/{pid}/comm") or "?").strip() or "?"


def _container(pid: int) -> str | None:
    text = _read(f"/proc/{pid}/cgroup")
    return container_id(text) if text else None


def _device_mounts(pid: int, device: str) -> list[mounts.MountEntry] | None:
    """The mounts of *device* in the mount namespace of *pid* (None: unreadable)."""
    text = _read(f"/proc/{pid}/mountinfo")
    if text is None:
        return None
    return [e for e in mounts.parse_mountinfo(text) if e.device == device]


def _dir_mount(pid: int, which: str) -> int | None:
    """The mount id of the working ("cwd") or root ("root") directory of *pid*, without
    asking its file system anything (see the module's docstring)."""
    try:
        fd = os.open(f"/proc/{pid}/{which}", os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return sysmount.fdinfo_mount_id(f"/proc/self/fdinfo/{fd}")
    finally:
        os.close(fd)


def _uses(pid: int, mount_ids: set[int], major: int, minor: int) -> Iterator[str]:
    """What process *pid* has on the mounts *mount_ids* (of device *major*:*minor*).

    Mappings are matched by device, so they are found also on a mount no namespace shows any
    more (detached with ``umount -l``); files and directories only by mount id."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd") if mount_ids else []
    except OSError:
        fds = []
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")  # no file system call: a name only
        except OSError:
            continue
        if target.startswith(_PSEUDO):
            continue
        if sysmount.fdinfo_mount_id(f"/proc/{pid}/fdinfo/{fd}") in mount_ids:
            yield FD
            break
    for which, what in (("cwd", CWD), ("root", ROOT)):
        if mount_ids and _dir_mount(pid, which) in mount_ids:
            yield what
    if _maps_device(pid, major, minor):
        yield MMAP


def _maps_device(pid: int, major: int, minor: int) -> bool:
    """Whether *pid* maps a file of device *major*:*minor* (/proc/PID/maps: "MM:mm" in hex)."""
    text = _read(f"/proc/{pid}/maps")
    if not text:
        return False
    for line in text.splitlines():
        fields = line.split(None, 5)
        if len(fields) < 5 or fields[4] == "0":  # inode 0: anonymous memory
            continue
        dev_major, _, dev_minor = fields[3].partition(":")
        try:
            if int(dev_major, 16) == major and int(dev_minor, 16) == minor:
                return True
        except ValueError:
            continue
    return False
