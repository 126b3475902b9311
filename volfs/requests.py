"""The requests of the control protocols, as typed dataclasses decoded at the edge.

One dataclass per command: the daemon's (control.py, control_server.py) and a worker's
(workerctl.py).  A request arrives as ``{"cmd": NAME, "args": MAP}``; :func:`decode` turns the
map into the command's dataclass or raises :class:`VolfsError` (``ErrorCode.INVALID``) with one
line naming the missing, unknown or mistyped argument.  Past the edge every value has its
field's type: sizes are bytes, names are checked, mount points are normalised paths, so the
supervisor and the worker never see the wire's shapes.

A field is checked against its wire type (the field's type, or ``wire`` where the wire
carries something else, such as ``"10G"`` for a size) and then given to its parser, the same
one the CLI flag and the config key of that name use (catalog.py).  The command names and
argument names are the protocol: they stay, so that an older CLI can drive a newer daemon.
"""

# No `from __future__ import annotations`: decode() reads each field's type as the type
# object itself (``str | int``, ``list[str]``), never by parsing annotation strings.

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from volfs.catalog import parse_gid, parse_inodes, parse_labels, parse_mode, parse_size, parse_uid
from volfs.errors import ErrorCode, VolfsError
from volfs.mountpoint import normalize
from volfs.store.headers import check_name
from volfs.store.snapshots import check_target, parse_name

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def _parsed(parse: Callable[[Any], Any], wire: object) -> dict[str, object]:
    """A field's metadata: its wire value, of type *wire*, becomes its value through *parse*."""
    return {"parse": parse, "wire": wire}


def _size_or_none(value: str | int) -> int:
    return parse_size(value) if value else 0  # 0 (or ""): no size limit


def _inodes_or_none(value: str | int) -> int:
    return parse_inodes(value) if value else 0  # 0: no inode limit


def _inodes_or_keep(value: str | int | None) -> int | None:
    return parse_inodes(value) if value else None  # None: keep the current limit


def _labels(value: dict[Any, Any] | None) -> dict[str, str]:
    return parse_labels(value or {})


def _or_none(parse: Callable[[str | int], int]) -> Callable[[str | int | None], int | None]:
    """*parse*, with None (not given) kept as None."""
    return lambda value: None if value is None else parse(value)


def _engine(value: str | None) -> str | None:
    return None if value is None else check_name(value)


_NAME = _parsed(check_name, str)
_TARGET = _parsed(check_target, str)  # a volume, or a snapshot of one (NAME@SNAP)
_SNAPSHOT = _parsed(lambda text: parse_name(text) and text, str)  # NAME@SNAP only
_MOUNTPOINT = _parsed(normalize, str)


# -- the daemon's commands ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CreateRequest:
    """Create volume *name* (nothing happens if it exists alike) on *engine*, its root
    directory owned by *uid* and *gid* with permission bits *mode*."""

    command: ClassVar[str] = "create"
    name: str = field(metadata=_NAME)
    size: int = field(default=0, metadata=_parsed(_size_or_none, str | int))
    labels: dict[str, str] = field(default_factory=dict, metadata=_parsed(_labels, dict | None))
    inodes: int = field(default=0, metadata=_parsed(_inodes_or_none, str | int))
    # The owner and mode of its root directory; None: not given (the daemon's uid and gid,
    # 0755), and so not sent, which a daemon of before these fields needs.
    uid: int | None = field(default=None, metadata=_parsed(_or_none(parse_uid), str | int | None))
    gid: int | None = field(default=None, metadata=_parsed(_or_none(parse_gid), str | int | None))
    mode: int | None = field(default=None, metadata=_parsed(_or_none(parse_mode), str | int | None))
    #: The engine to create it on (`volfs.engines`); None: the local store.
    engine: str | None = field(default=None, metadata=_parsed(_engine, str | None))


@dataclasses.dataclass(frozen=True)
class LsRequest:
    """Every volume of the store, as `ls` shows them; with *snapshots*, every snapshot."""

    command: ClassVar[str] = "ls"
    snapshots: bool = False


@dataclasses.dataclass(frozen=True)
class InspectRequest:
    """The volumes and snapshots (NAME@SNAP) *names*, in that order."""

    command: ClassVar[str] = "inspect"
    names: list[str] = field(metadata=_parsed(lambda names: [check_target(n) for n in names],
                                              list[str]))  # fmt: skip


@dataclasses.dataclass(frozen=True)
class StatusRequest:
    """The daemon's state and every volume it serves."""

    command: ClassVar[str] = "status"


@dataclasses.dataclass(frozen=True)
class MountRequest:
    """Serve *name* at *mountpoint*, creating the volume (with *size*, *inodes*) if it is new;
    with *create* False a volume that does not exist is refused (NOT_FOUND) instead.  A
    snapshot (NAME@SNAP) is always mounted read-only and never created."""

    command: ClassVar[str] = "mount"
    name: str = field(metadata=_TARGET)
    mountpoint: Path = field(metadata=_MOUNTPOINT)
    read_only: bool = False
    size: int = field(default=0, metadata=_parsed(_size_or_none, str | int))
    inodes: int = field(default=0, metadata=_parsed(_inodes_or_none, str | int))
    create: bool = True


@dataclasses.dataclass(frozen=True)
class UmountRequest:
    """Unmount *mountpoint*; *lazy*: detach it even while it is in use."""

    command: ClassVar[str] = "umount"
    mountpoint: Path = field(metadata=_MOUNTPOINT)
    lazy: bool = False


@dataclasses.dataclass(frozen=True)
class UmountAllRequest:
    """The full stop: every volume unmounted, every worker ended."""

    command: ClassVar[str] = "umount_all"


@dataclasses.dataclass(frozen=True)
class RmRequest:
    """Destroy volume (or snapshot, NAME@SNAP) *name*; *force*: unmount it first; *recursive*:
    a volume's snapshots go with it (without, a volume that has some is refused)."""

    command: ClassVar[str] = "rm"
    name: str = field(metadata=_TARGET)
    force: bool = False
    recursive: bool = False


@dataclasses.dataclass(frozen=True)
class ResizeRequest:
    """New limits for volume *name*; *inodes* None keeps its inode limit."""

    command: ClassVar[str] = "resize"
    name: str = field(metadata=_NAME)
    size: int = field(metadata=_parsed(parse_size, str | int))
    inodes: int | None = field(default=None, metadata=_parsed(_inodes_or_keep, str | int | None))


@dataclasses.dataclass(frozen=True)
class SnapshotRequest:
    """Snapshot *name*, now, mounted or not; *snapshot* is NAME@SNAP."""

    command: ClassVar[str] = "snapshot"
    snapshot: str = field(metadata=_SNAPSHOT)


@dataclasses.dataclass(frozen=True)
class CloneRequest:
    """Make volume *name* from snapshot *snapshot* (NAME@SNAP), with *size* (None: the
    origin's)."""

    command: ClassVar[str] = "clone"
    snapshot: str = field(metadata=_SNAPSHOT)
    name: str = field(metadata=_NAME)
    size: int | None = field(default=None, metadata=_parsed(_or_none(parse_size), str | int | None))


@dataclasses.dataclass(frozen=True)
class RollbackRequest:
    """Return the unmounted volume of *snapshot* (NAME@SNAP) to that snapshot."""

    command: ClassVar[str] = "rollback"
    snapshot: str = field(metadata=_SNAPSHOT)


@dataclasses.dataclass(frozen=True)
class StatsRequest:
    """The request counts and figures of the served volumes *names* (empty: all)."""

    command: ClassVar[str] = "stats"
    names: list[str] = field(default_factory=list, metadata=_parsed(
        lambda names: [check_target(n) for n in names], list[str]))  # fmt: skip


DaemonRequest = (
    CreateRequest
    | LsRequest
    | InspectRequest
    | StatusRequest
    | MountRequest
    | UmountRequest
    | UmountAllRequest
    | RmRequest
    | ResizeRequest
    | SnapshotRequest
    | CloneRequest
    | RollbackRequest
    | StatsRequest
)

# -- a worker's commands (workerctl.py) --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WorkerStatusRequest:
    """What the worker serves: protocol, version, store root, pid, mount point, device."""

    command: ClassVar[str] = "status"


@dataclasses.dataclass(frozen=True)
class SetLimitsRequest:
    """New limits for the served volume, at once and in its header; *inodes* None keeps it."""

    command: ClassVar[str] = "set_limits"
    size: int
    inodes: int | None  # required, not defaulted: so encode() always sends it, as
    # workers of before requests.py need


@dataclasses.dataclass(frozen=True)
class TakeSnapshotRequest:
    """Snapshot the served volume as *snapshot* (SNAP: its name without the volume's) between
    two requests; the reply is the snapshot's header."""

    command: ClassVar[str] = "take_snapshot"
    snapshot: str = field(metadata=_parsed(check_name, str))


@dataclasses.dataclass(frozen=True)
class WorkerStatsRequest:
    """The worker's request counts (`volfs.opstats`) and the served volume's figures."""

    command: ClassVar[str] = "stats"


WorkerRequest = WorkerStatusRequest | SetLimitsRequest | TakeSnapshotRequest | WorkerStatsRequest

DAEMON_COMMANDS: dict[str, type[DaemonRequest]] = {
    cls.command: cls
    for cls in (
        CreateRequest, LsRequest, InspectRequest, StatusRequest, MountRequest,
        UmountRequest, UmountAllRequest, RmRequest, ResizeRequest, SnapshotRequest,
        CloneRequest, RollbackRequest, StatsRequest,
    )
}  # fmt: skip
WORKER_COMMANDS: dict[str, type[WorkerRequest]] = {
    cls.command: cls
    for cls in (WorkerStatusRequest, SetLimitsRequest, TakeSnapshotRequest, WorkerStatsRequest)
}


def malformed(problem: str) -> VolfsError:
    return VolfsError(f"malformed request: {problem}", ErrorCode.INVALID)


def decode(commands: Mapping[str, type[T]], cmd: object, args: object) -> T:
    """The request *cmd* with *args* (a frame's ``cmd`` and ``args``), typed and checked."""
    cls = commands.get(cmd) if isinstance(cmd, str) else None
    if cls is None:
        raise malformed(f"unknown command {str(cmd)[:40]!r}")
    if not isinstance(args, dict):
        raise malformed("args must be a map")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(a) for a in set(args) - set(fields))
    if unknown:
        raise malformed(f"unknown argument {unknown[0][:40]!r}")
    values = {}
    for name, spec in fields.items():
        if name not in args:
            required = spec.default is dataclasses.MISSING
            if required and spec.default_factory is dataclasses.MISSING:
                raise malformed(f"missing argument {name!r}")
            continue
        wire = spec.metadata.get("wire", spec.type)
        if not _fits(args[name], wire):
            raise malformed(f"argument {name!r} must be a {_type_name(wire)}")
        parse = spec.metadata.get("parse")
        values[name] = parse(args[name]) if parse is not None else args[name]
    return cls(**values)


def encode(request: DaemonRequest | WorkerRequest) -> dict[str, object]:
    """The frame of *request*, as :func:`decode` reads it: paths as strings, and arguments
    left at their defaults left out (so a request that does not use a newer argument still
    reaches an older peer that does not know it)."""
    args: dict[str, object] = {}
    for spec in dataclasses.fields(request):
        value = getattr(request, spec.name)
        default = spec.default
        if spec.default_factory is not dataclasses.MISSING:
            default = spec.default_factory()
        if value == default and default is not dataclasses.MISSING:
            continue
        args[spec.name] = str(value) if isinstance(value, Path) else value
    return {"cmd": request.command, "args": args}


def _fits(value: object, wire: object) -> bool:
    """Whether *value* (as msgpack decodes it) is of type *wire*; a bool is not an int."""
    origin = typing.get_origin(wire)
    if origin is types.UnionType or origin is typing.Union:
        return any(_fits(value, option) for option in typing.get_args(wire))
    if wire is None or wire is type(None):
        return value is None
    if wire is bool:
        return isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(wire)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(wire)
        return isinstance(value, dict) and all(
            _fits(k, key) and _fits(v, item) for k, v in value.items()
        )
    if isinstance(wire, type):
        return isinstance(value, wire) and not (isinstance(value, bool) and wire is not bool)
    raise TypeError(f"no wire check for {wire!r}")


def _type_name(wire: object) -> str:
    if typing.get_origin(wire) in (types.UnionType, typing.Union):
        return " or ".join(_type_name(option) for option in typing.get_args(wire))
    if wire is None or wire is type(None):
        return "None"
    if typing.get_origin(wire) is list:
        return f"list of {_type_name(typing.get_args(wire)[0])}"
    return getattr(wire, "__name__", str(wire))
