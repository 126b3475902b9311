"""The engines a host's volumes live on, as one namespace of volume names.

Every host has the ``local`` engine: its own store (`volfs.store.root.StoreRoot`).  The config's
``[engines.NAME]`` tables add *cluster* engines: PostgreSQL databases (`volfs.pg`) whose volumes
any host that names the same database serves.  A volume name means one volume across all of
them, so:

* a name is looked up in the store first, then in each cluster engine (`Engines.locate`);
* creating a name another engine holds is refused (`Engines.check_free`);
* while a cluster engine cannot be reached, a name found nowhere may be held by it, so it is
  *not* created on first use (`volfsd mount`, Docker's ``-v NAME:/path``): that would make a
  local volume the cluster's name shadows, with data written to the wrong place.  An explicit
  ``create`` still works: it says where.

The calls to a cluster engine block on the network (a few ms on a LAN; `volfs.pg.schema`
bounds them with timeouts): the daemon makes them in a thread.  A URL may hold a password:
it is never part of a message (`volfs.config.redact_url`).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from volfs.catalog import LOCAL_ENGINE
from volfs.config import EngineConfig
from volfs.errors import ErrorCode, VolfsError
from volfs.store.root import StoreRoot

if TYPE_CHECKING:
    from volfs.pg.schema import VolumeRow
    from volfs.requests import CreateRequest

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class ClusterEngine:
    """A cluster engine of the config: its name and its database's URL."""

    name: str
    url: str

    def volumes(self) -> dict[str, VolumeRow]:
        """Its volumes by name; `VolfsError` (unavailable) naming the engine if it cannot be
        reached."""
        from volfs.pg import schema  # the driver loads only where an engine is configured

        rows = self._call(schema.list_volumes, self.url)
        return {row.name: row for row in rows}

    def create(self, name: str, size: int, inodes: int, uid: int, gid: int, mode: int) -> None:
        from volfs.pg import schema

        self._call(schema.create_volume, self.url, name, size, inodes, uid, gid, mode)

    def remove(self, name: str) -> None:
        from volfs.pg import schema

        self._call(schema.remove_volume, self.url, name)

    def _call(self, function: Callable[..., T], *args: Any) -> T:
        """*function(args)*, its failures as `VolfsError` naming this engine: a database
        error (a lost connection, a timeout) is unavailable, never a traceback."""
        import psycopg

        from volfs.pg.schema import first_line

        try:
            return function(*args)
        except VolfsError as exc:
            raise VolfsError(f"engine {self.name}: {exc}", exc.code) from None
        except psycopg.Error as exc:
            raise VolfsError(f"engine {self.name}: {first_line(exc)}",
                             ErrorCode.UNAVAILABLE) from None  # fmt: skip


@dataclasses.dataclass
class Listing:
    """Every volume name the engines hold, and the engines that could not be asked."""

    #: name -> (engine, its row if a cluster engine's)
    volumes: dict[str, tuple[str, VolumeRow | None]]
    unreachable: dict[str, str]  #: engine -> why


class Engines:
    """The local store *root* and the cluster engines *configs* name."""

    def __init__(self, root: StoreRoot, configs: dict[str, EngineConfig]) -> None:
        self.root = root
        self.clusters = {name: ClusterEngine(name, c.url) for name, c in configs.items()}

    def cluster(self, engine: str) -> ClusterEngine:
        """Cluster engine *engine*; `VolfsError` if the config has none of that name."""
        found = self.clusters.get(engine)
        if found is None:
            known = ", ".join([LOCAL_ENGINE, *self.clusters])
            raise VolfsError(
                f"no engine {engine[:64]}: the engines are {known} (cluster engines are "
                "[engines.NAME] tables of the daemon's config)",
                ErrorCode.NOT_FOUND,
            )
        return found

    def listing(self) -> Listing:
        """What every engine holds; a local name shadows none (`check_free` keeps it so)."""
        found: dict[str, tuple[str, VolumeRow | None]] = {}
        unreachable: dict[str, str] = {}
        for engine in self.clusters.values():
            try:
                rows = engine.volumes()
            except VolfsError as exc:
                unreachable[engine.name] = str(exc)
                continue
            for name, row in rows.items():
                found.setdefault(name, (engine.name, row))
        for name in self.root.names():
            found[name] = (LOCAL_ENGINE, None)
        return Listing(found, unreachable)

    def reachability(self) -> dict[str, str]:
        """Each cluster engine: "ok", or why it cannot be reached (for `status`)."""
        found = {}
        for engine in self.clusters.values():
            try:
                engine.volumes()
                found[engine.name] = "ok"
            except VolfsError as exc:
                found[engine.name] = str(exc)
        return found

    def locate(self, name: str) -> str | None:
        """The engine that holds volume *name*, or None if none does (see `find`)."""
        found = self.find(name)
        return None if found is None else found[0]

    def find(self, name: str) -> tuple[str, VolumeRow | None] | None:
        """The engine that holds volume *name* and, for a cluster engine, its row; None if
        none does; `VolfsError` (unavailable) if none that could be asked does and a cluster
        engine could not be asked: it may hold it."""
        if self.root.exists(name):
            return LOCAL_ENGINE, None
        missed = []
        for engine in self.clusters.values():
            try:
                row = engine.volumes().get(name)
            except VolfsError as exc:
                missed.append(str(exc))
                continue
            if row is not None:
                return engine.name, row
        if missed:
            raise VolfsError(
                f"volume {name} is not in the local store, and it may be on an engine that "
                f"cannot be reached ({missed[0]}): not creating it here; try again when the "
                f"engine is back, or create it with `volfsd create {name} --engine ENGINE`",
                ErrorCode.UNAVAILABLE,
            )
        return None

    def check_free(self, name: str, engine: str) -> None:
        """Refuse to create *name* on *engine* if another engine holds it (EXISTS).  Engines
        that cannot be reached are not asked: the creation names its engine."""
        holders = [LOCAL_ENGINE] if self.root.exists(name) else []
        for other in self.clusters.values():
            try:
                if name in other.volumes():
                    holders.append(other.name)
            except VolfsError:
                continue
        elsewhere = [h for h in holders if h != engine]
        if elsewhere:
            raise VolfsError(
                f"volume {name} exists on engine {elsewhere[0]}: a name means one volume "
                "across every engine; choose another name",
                ErrorCode.EXISTS,
            )

    def create(self, request: CreateRequest, engine: str) -> None:
        """Create the volume of *request* on cluster engine *engine*, after `check_free`;
        EXISTS if that engine has it (labels are the local store's only: refused here)."""
        cluster = self.cluster(engine)
        if request.labels:
            raise VolfsError(f"engine {engine}: volumes of a cluster engine take no labels yet")
        self.check_free(request.name, engine)
        uid = 0 if request.uid is None else request.uid
        gid = 0 if request.gid is None else request.gid
        mode = 0o755 if request.mode is None else request.mode
        cluster.create(request.name, request.size, request.inodes, uid, gid, mode)


def describe_cluster(name: str, engine: str, row: VolumeRow) -> dict[str, Any]:
    """What `ls` and `inspect` show of a cluster engine's volume that this host does not
    serve (the supervisor adds its mounts and status when it does)."""
    return {
        "name": name,
        "engine": engine,
        "size": row.quota,
        "used": row.used,
        "inodes": row.inodes,
        "inodes_limit": row.inode_limit,
        "mounts": [],
        "read_only": [],
        "status": "unmounted",
        "created": _utc(row.created),
        "labels": {},
    }


def _utc(created: str) -> str:
    """PostgreSQL's text of a timestamptz ("2026-12-02 01:20:58.12+01", in the session's
    time zone) in UTC as `ls` shows local volumes' ("2026-12-02T00:20:58Z")."""
    try:
        when = datetime.datetime.fromisoformat(created)
    except ValueError:
        return created
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
