"""``volfsd serve``: the daemon process, which runs the supervisor and its front ends.

The daemon owns the store root and a runtime directory (one daemon per runtime directory, by
a pid lock).  In it, the supervisor (supervisor.py) serves the volumes; the control server
(control_server.py) answers `volfsd` commands on a unix socket, and the Docker plugin
(docker_plugin.py) answers Docker on ``/run/docker/plugins/NAME.sock``.  It tells systemd
(``Type=notify``) when it is ready and when it stops.  SIGTERM or SIGINT ends the daemon but
not its workers: they go on serving, and the next daemon adopts them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from pathlib import Path

import trio

from volfs import control, logs, metrics
from volfs.config import (
    DEFAULT_PATH,
    PLUGIN_OFF,
    DaemonConfig,
    docker_plugin_name,
    load_config,
    metrics_address,
)
from volfs.control_server import ControlServer, listen
from volfs.docker_driver import CLUSTER_SUFFIX, DockerDriver
from volfs.docker_plugin import PluginServer, PluginSocket, socket_path
from volfs.errors import ErrorCode, VolfsError
from volfs.scrub_schedule import scrub_forever
from volfs.store import pidlock
from volfs.store.root import StoreRoot, default_root
from volfs.supervisor import Supervisor

log = logging.getLogger(__name__)


def notify(state: str) -> None:
    """Tell systemd (Type=notify) about *state*, if it is listening."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock,
    ):
        sock.sendto(state.encode(), address)


def take_run_dir(run_dir: Path) -> int:
    """Make *run_dir* (0700) and take its pid lock; the lock's fd.  Refused (code
    ALREADY_SERVED) while another daemon holds it."""
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(run_dir, 0o700)
    dir_fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return pidlock.take(control.PID_FILE, dir_fd)
    except pidlock.LockHeld as held:
        raise VolfsError(
            f"another volfsd (pid {held.holder}) already serves {run_dir}: "
            "stop it first, or set VOLFS_RUN_DIR to another directory",
            ErrorCode.ALREADY_SERVED,
        ) from None
    finally:
        os.close(dir_fd)


async def run(
    root: StoreRoot,
    run_dir: Path,
    config: DaemonConfig | None,
    plugin: str = PLUGIN_OFF,
    metrics_at: str = PLUGIN_OFF,
) -> None:
    """Serve until SIGTERM or SIGINT, then hand the workers over to the next daemon.

    *plugin* is the Docker driver name to serve, or "off"; *metrics_at* the metrics
    address (HOST:PORT), or "off".
    """
    # Not the directory we were started from: a daemon that stays there pins it (a
    # tmpfs it lies on could not be unmounted), and so would every worker it starts.
    os.chdir("/")
    pid_fd = take_run_dir(run_dir)
    path = run_dir / control.SOCKET_NAME
    plugin_sockets: list[PluginSocket] = []  # the local driver's, then the cluster driver's
    metrics_socket = None
    try:
        listener = await listen(path)
        if metrics_at != PLUGIN_OFF:  # an address in use is refused before anything is mounted
            metrics_socket = metrics.listen(metrics.address_of(metrics_at))
        # Before anything is mounted: a driver name another process serves is refused first.
        if plugin != PLUGIN_OFF:
            plugin_sockets.append(PluginSocket(socket_path(plugin)))
            if config is not None and config.engines:
                plugin_sockets.append(PluginSocket(socket_path(plugin + CLUSTER_SUFFIX)))
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                supervisor = Supervisor(root, run_dir, nursery)
                nursery.start_soon(ControlServer(supervisor).serve, listener)
                await supervisor.start(config)
                _serve_plugins(nursery, supervisor, plugin_sockets)
                if metrics_socket is not None:
                    metrics_listener = trio.socket.from_stdlib_socket(metrics_socket)
                    nursery.start_soon(metrics.MetricsServer(supervisor).serve, metrics_listener)
                    log.info("serving metrics at http://%s/metrics", metrics_at)
                if config is not None:
                    nursery.start_soon(scrub_forever, root, config)
                log.info("volfsd ready: store %s, socket %s", root.path, path)
                notify("READY=1")
                async for signum in signals:
                    log.info("received %s", signal.Signals(signum).name)
                    break
                notify("STOPPING=1")
                # A hand-off, not a stop: the workers go on serving, and the next daemon
                # adopts them.  `volfsd umount --all` is the full stop.
                log.info(
                    "stopping; %d volume(s) stay served by their workers "
                    "(`volfsd umount --all` unmounts them)",
                    len(supervisor.served),
                )
                nursery.cancel_scope.cancel()
    finally:
        if metrics_socket is not None:
            metrics_socket.close()
        for plugin_socket in plugin_sockets:
            plugin_socket.close()
        with contextlib.suppress(OSError):
            path.unlink()
        with contextlib.suppress(OSError):
            (run_dir / control.PID_FILE).unlink()
        os.close(pid_fd)


def _serve_plugins(
    nursery: trio.Nursery, supervisor: Supervisor, sockets: list[PluginSocket]
) -> None:
    """Serve the Docker drivers on *sockets*: the local one, and the cluster one if there."""
    lock = trio.Lock()
    for cluster, plugin_socket in enumerate(sockets):
        driver = DockerDriver(supervisor, cluster=bool(cluster), lock=lock)
        listener = trio.socket.from_stdlib_socket(plugin_socket.listener)
        nursery.start_soon(PluginServer(driver).serve, listener)
        if not cluster:  # the claims of both drivers' volumes
            nursery.start_soon(driver.reconcile_forever)
        log.info("serving Docker volume driver %s (%s scope) at %s",
                 plugin_socket.path.stem, driver.scope, plugin_socket.path)  # fmt: skip


def serve(
    config_path: Path | None,
    docker_plugin: str | None = None,
    metrics_flag: str | None = None,
    log_format: str | None = None,
) -> None:
    """Run the daemon in this process until SIGTERM or SIGINT; *docker_plugin* is the
    ``--docker-plugin`` flag (config.docker_plugin_name says what else decides), *metrics_flag*
    ``--metrics`` (config.metrics_address), *log_format* the ``--log-format`` flag (else the
    config's ``log_format``, else text lines)."""
    root = StoreRoot(default_root())
    if config_path is None and DEFAULT_PATH.exists() and os.geteuid() == 0:
        config_path = DEFAULT_PATH
    # A bad config is refused before anything is taken.
    config = load_config(config_path) if config_path is not None else None
    log_format = log_format or (config and config.log_format) or "text"
    # The journal when systemd gave it to us as stderr: the workers then use it too.
    logs.configure(log_format, logs.DAEMON_LAYOUT, journal=logs.stderr_is_journal())
    run_dir = control.default_run_dir()
    plugin = docker_plugin_name(docker_plugin, config, run_dir)
    trio.run(run, root, run_dir, config, plugin, metrics_address(metrics_flag, config, run_dir))
