"""The daemon's config file (``/etc/volfs/volumes.toml``): its schema, in one place.

A TOML file of top-level daemon keys (:data:`DAEMON_KEYS`: ``docker_plugin``, ``metrics``,
``scrub_every``, ``log_format``) and tables: one
``[volumes.NAME]`` per declared volume, whose keys are the `create` flags (``size``,
``labels``, ``inodes``, ``uid``, ``gid``, ``mode``), parsed by the same parsers as those flags
(catalog.py), plus where it is mounted (``paths``, ``read_only``) and on which engine it lives
(``engine``); and one ``[engines.NAME]`` per cluster engine, whose ``url`` says where its
database is (``postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE``).  So a config key and a CLI
flag with one name mean one thing.  Unknown keys and tables are errors that name the file, the
table and the key; a value that does not parse is one that names the volume.

Who may change the file decides what is mounted where, as root: a file that is writable by
group or others, or owned by another user than root or the daemon's, is refused.  A file that
holds a table of credentials (:data:`CREDENTIAL_TABLES`: the ``[engines.NAME]`` tables, whose
URLs may carry passwords) is also refused when others can read it.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from volfs.catalog import (
    LOCAL_ENGINE,
    parse_gid,
    parse_inodes,
    parse_labels,
    parse_mode,
    parse_size,
    parse_uid,
)
from volfs.control import SYSTEM_RUN_DIR
from volfs.errors import VolfsError
from volfs.logs import parse_log_format
from volfs.mountpoint import normalize
from volfs.store.headers import check_name

DEFAULT_PATH = Path("/etc/volfs/volumes.toml")


@dataclasses.dataclass(frozen=True)
class VolumeConfig:
    """A declared volume: created if it does not exist, and mounted at each of *paths*."""

    paths: tuple[Path, ...] = ()
    size: int = 0  #: bytes; 0: no size limit
    read_only: bool = False  #: for every path of *paths*
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    inodes: int = 0  #: 0: no inode limit
    #: Owner, group and permission bits of its root directory, if it is created now; None:
    #: the daemon's uid and gid (root's), 0755.
    uid: int | None = None
    gid: int | None = None
    mode: int | None = None
    #: Seconds between background scrubs of it (`parse_duration`); None: the daemon's.
    scrub_every: float | None = None
    #: The engine that holds it (`parse_engine_name`): "local" (the host's store) or a name of
    #: an ``[engines.NAME]`` table.
    engine: str = "local"


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """A cluster engine: a PostgreSQL database that holds volumes served by several hosts."""

    url: str  #: `parse_engine_url`; may carry a password, so never logged or shown whole


@dataclasses.dataclass(frozen=True)
class DaemonConfig:
    """What a config file says: the daemon's settings and the volumes it declares, by name."""

    volumes: dict[str, VolumeConfig] = dataclasses.field(default_factory=dict)
    engines: dict[str, EngineConfig] = dataclasses.field(default_factory=dict)
    #: The Docker volume driver name to serve (`parse_plugin_name`); None: not set here.
    docker_plugin: str | None = None
    #: Where to serve Prometheus metrics (`parse_metrics_address`): "HOST:PORT" or "off".
    metrics: str | None = None
    #: Seconds between background scrubs of each volume (`parse_duration`); 0 or None: none.
    scrub_every: float | None = None
    #: ``text`` or ``json`` (`logs.parse_log_format`); None: not set here.
    log_format: str | None = None


#: `docker_plugin` (and ``--docker-plugin``) that serves no Docker plugin.
PLUGIN_OFF = "off"
#: The driver name served by a root daemon when nothing says otherwise.
DEFAULT_PLUGIN = "volfs"


def parse_plugin_name(value: object) -> str:
    """A Docker volume driver name (the socket ``/run/docker/plugins/NAME.sock``), or "off".

    Names follow the volume name rules (so one is a safe file name): 1-63 characters of
    ``a-z 0-9 _ . -``, starting with a letter or digit.
    """
    if value == PLUGIN_OFF:
        return PLUGIN_OFF
    if not isinstance(value, str):
        raise VolfsError('docker_plugin must be a driver name or "off"')
    try:
        return check_name(value)
    except VolfsError:
        raise VolfsError(
            f"invalid Docker driver name {value[:40]!r}: use 1-63 of a-z 0-9 _ . - starting "
            "with a letter or digit, or off"
        ) from None


#: The system daemon's metrics address when nothing says otherwise (loopback only).
DEFAULT_METRICS = "127.0.0.1:9567"
METRICS_ENV = "VOLFS_METRICS"


def parse_metrics_address(value: object) -> str:
    """``HOST:PORT`` (``[::1]:9567`` for IPv6) to serve metrics on, or "off"."""
    if value == PLUGIN_OFF:
        return PLUGIN_OFF
    text = value if isinstance(value, str) else ""
    host, sep, port = text.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
        raise VolfsError(
            f"invalid metrics address {text[:80]!r}: give HOST:PORT (127.0.0.1:9567), or off"
        )
    return text


def metrics_address(flag: str | None, config: DaemonConfig | None, run_dir: Path) -> str:
    """Where the daemon of *run_dir* serves metrics: ``--metrics``, else the config's
    ``metrics``, else $VOLFS_METRICS, else 127.0.0.1:9567 for the system's daemon and "off"
    for any other (as `docker_plugin_name`: a daemon of a store of its own must not take the
    host's port)."""
    for value in (flag, config and config.metrics, os.environ.get(METRICS_ENV)):
        if value:
            return parse_metrics_address(value)
    system = os.geteuid() == 0 and run_dir == SYSTEM_RUN_DIR
    return DEFAULT_METRICS if system else PLUGIN_OFF


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_engine_name(value: object) -> str:
    """An engine's name: ``local`` or the name of an ``[engines.NAME]`` table (a volume
    name's rules: letters, digits, ``_.-``, at most 64 characters)."""
    if not isinstance(value, str):
        raise VolfsError("an engine name must be a string, such as local or cluster")
    return check_name(value)


#: The URL schemes of a PostgreSQL database (libpq's).
ENGINE_URL_SCHEMES = ("postgresql://", "postgres://")


def parse_engine_url(value: object) -> str:
    """A cluster engine's ``url``: a libpq connection URI of its PostgreSQL database."""
    if not isinstance(value, str) or not value.startswith(ENGINE_URL_SCHEMES):
        raise VolfsError(
            "url must be a PostgreSQL connection URI, such as postgresql://volfs@db.internal/volfs"
        )
    return value


def redact_url(url: str) -> str:
    """*url* with any password replaced by ``***``, for messages and listings."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{host}"


def parse_duration(value: object) -> float:
    """A duration: a whole number and a unit (``90s``, ``30m``, ``12h``, ``7d``), as seconds;
    "off" is 0 (never)."""
    if value == PLUGIN_OFF:
        return 0.0
    text = value if isinstance(value, str) else ""
    number, unit = text[:-1], text[-1:]
    if not number.isdigit() or unit not in _UNITS or int(number) == 0:
        raise VolfsError(f"invalid duration {text[:40]!r}: give a number and s, m, h or d "
                         "(7d, 12h), or off")  # fmt: skip
    return float(int(number) * _UNITS[unit])


def _paths(value: object) -> tuple[Path, ...]:
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise VolfsError("paths must be a list of absolute paths")
    return tuple(normalize(p) for p in value)


def _flag(value: object) -> bool:
    # Any value, by its truth: what config files were given before this schema, kept working.
    return bool(value)


#: The environment variable that names the driver where neither flag nor config does: for the
#: daemon `volfsd mount` starts in the background, as VOLFS_ROOT and VOLFS_RUN_DIR place it.
PLUGIN_ENV = "VOLFS_DOCKER_PLUGIN"


def docker_plugin_name(flag: str | None, config: DaemonConfig | None, run_dir: Path) -> str:
    """The Docker driver the daemon of *run_dir* serves: ``--docker-plugin``, else the
    config's ``docker_plugin``, else $VOLFS_DOCKER_PLUGIN, else "volfs" for the system's
    daemon (root's, in /run/volfs) and "off" for any other: a daemon that `volfsd mount`
    started for a store of its own must neither take the host's driver name nor fail
    because the system's daemon has it."""
    for value in (flag, config and config.docker_plugin, os.environ.get(PLUGIN_ENV)):
        if value:
            return parse_plugin_name(value)
    system = os.geteuid() == 0 and run_dir == SYSTEM_RUN_DIR
    return DEFAULT_PLUGIN if system else PLUGIN_OFF


#: The keys of a ``[volumes.NAME]`` table, each with its parser (the CLI flag's, where there
#: is one).  Each key is a field of VolumeConfig.
VOLUME_KEYS: dict[str, Callable[[Any], object]] = {
    "paths": _paths,
    "size": parse_size,
    "read_only": _flag,
    "labels": parse_labels,
    "inodes": parse_inodes,
    "uid": parse_uid,
    "gid": parse_gid,
    "mode": parse_mode,
    "scrub_every": parse_duration,
    "engine": parse_engine_name,
}
#: The keys of an ``[engines.NAME]`` table, each with its parser.
ENGINE_KEYS: dict[str, Callable[[Any], object]] = {"url": parse_engine_url}
#: The top-level daemon keys, each with its parser.  Each is a field of DaemonConfig.
DAEMON_KEYS: dict[str, Callable[[Any], object]] = {
    "docker_plugin": parse_plugin_name,
    "metrics": parse_metrics_address,
    "scrub_every": parse_duration,
    "log_format": parse_log_format,
}
#: The tables of the file: ``[NAME.*]`` -> the keys of each of its sub-tables.
TABLES: dict[str, dict[str, Callable[[Any], object]]] = {
    "volumes": VOLUME_KEYS,
    "engines": ENGINE_KEYS,
}
#: Tables that hold credentials: a file with one must not be readable by others.
CREDENTIAL_TABLES = ("engines",)


def load_config(path: Path) -> DaemonConfig:
    """The config file at *path*, checked whole; VolfsError (one line) if anything is wrong."""
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
            check_access(path, os.fstat(f.fileno()), document)
    except FileNotFoundError:
        raise VolfsError(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise VolfsError(f"config file {path} is not valid TOML: {exc}") from None
    settings: dict[str, Any] = {}
    for key, value in document.items():
        if key in TABLES:
            continue
        if key not in DAEMON_KEYS:
            raise VolfsError(
                f"config file {path}: unknown key {key[:40]!r} at the top level: the keys are "
                f"{', '.join(DAEMON_KEYS)}, and [volumes.NAME] and [engines.NAME] tables"
            )
        settings[key] = _parsed(DAEMON_KEYS[key], value, f"config file {path}, key {key!r}")
    declared = {name: VolumeConfig(**values) for name, values in _tables(path, document, "volumes")}
    engines = {name: EngineConfig(**values) for name, values in _tables(path, document, "engines")}
    for name in engines:
        if name == LOCAL_ENGINE:
            raise VolfsError(
                f"config file {path}: [engines.{LOCAL_ENGINE}] is the host's own store and "
                "takes no table: give the cluster engine another name"
            )
    for name, spec in declared.items():
        if spec.engine != LOCAL_ENGINE and spec.engine not in engines:
            raise VolfsError(
                f"config file {path}, volume {name!r}: engine {spec.engine!r} has no "
                f"[engines.{spec.engine}] table"
            )
    return DaemonConfig(volumes=declared, engines=engines, **settings)


def _tables(path: Path, document: dict[str, Any], kind: str) -> list[tuple[str, dict[str, Any]]]:
    """The ``[KIND.NAME]`` tables of *document*, each checked and its values parsed."""
    keys = TABLES[kind]
    tables = document.get(kind, {})
    if not isinstance(tables, dict):
        raise VolfsError(f"config file {path}: {kind}: expected only [{kind}.NAME] tables")
    parsed = []
    for name, spec in tables.items():
        where = f"config file {path}, {kind.removesuffix('s')} {name!r}"
        check = _parsed(check_name, name, where)
        if not isinstance(spec, dict):
            raise VolfsError(f"{where}: [{kind}.{check}] must be a table")
        unknown = sorted(set(spec) - set(keys))
        if unknown:
            raise VolfsError(
                f"{where}: unknown key {unknown[0][:40]!r} in [{kind}.{check}]; "
                f"allowed keys are {', '.join(keys)}"
            )
        missing = [key for key in ENGINE_KEYS if kind == "engines" and key not in spec]
        if missing:
            raise VolfsError(f'{where}: [{kind}.{check}] needs {missing[0]} = "..."')
        parsed.append(
            (check, {key: _parsed(keys[key], value, where) for key, value in spec.items()})
        )
    return parsed


def _parsed(parse: Callable[[Any], Any], value: object, where: str) -> Any:
    try:
        return parse(value)
    except VolfsError as exc:
        raise VolfsError(f"{where}: {exc}", exc.code) from None


def check_access(path: Path, st: os.stat_result, document: dict[str, Any]) -> None:
    """Refuse a config file that other users could change, or read if it holds credentials."""
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in (0, os.geteuid()):
        raise VolfsError(
            f"config file {path} belongs to uid {st.st_uid}: it must be root's or the daemon's"
        )
    if mode & 0o022:
        raise VolfsError(
            f"config file {path} is writable by other users (mode {mode:04o}): chmod go-w {path}"
        )
    secret = [t for t in CREDENTIAL_TABLES if t in document]
    if secret and mode & 0o004:
        raise VolfsError(
            f"config file {path} holds credentials ([{secret[0]}]) and is readable by other "
            f"users (mode {mode:04o}): chmod o-r {path}"
        )
