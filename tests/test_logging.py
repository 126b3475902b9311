"""Where the daemon and its workers log: the journal (native protocol, on a socket the test
binds), JSON lines with ``--log-format json``, and the text lines of before by default."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from volfs import logs, mounts

from helpers import cli_env, run_dir_of, stop_foreground, wait_until
from hosts import Host

#: Text lines of the default format, as before this change (the worker's name its logger).
WORKER_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} volfsd\[(?P<pid>\d+)\] INFO volfs\.worker: "
    r"volume v mounted at ",
    re.M,
)
DAEMON_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} volfsd\[\d+\] INFO volfsd ready: ", re.M
)


def parse_entry(data: bytes) -> dict[str, str]:
    """One native-protocol entry: ``KEY=value`` lines, or KEY, newline, le64 length, value."""
    fields, at = {}, 0
    while at < len(data):
        end = data.index(b"\n", at)
        line = data[at:end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            at = end + 1
        else:
            key, (size,) = line, struct.unpack("<Q", data[end + 1 : end + 9])
            value = data[end + 9 : end + 9 + size]
            assert data[end + 9 + size : end + 10 + size] == b"\n"
            at = end + 10 + size
        assert re.fullmatch(rb"[A-Z0-9][A-Z0-9_]*", key), key
        fields[key.decode()] = value.decode()
    return fields


def receive_entry(sock: socket.socket) -> dict[str, str]:
    """The next entry on *sock*: a datagram's payload, or the memfd it carries."""
    data, ancillary, _, _ = sock.recvmsg(1 << 20, socket.CMSG_SPACE(struct.calcsize("i")))
    for level, kind, payload in ancillary:
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS) and not data
        fd = struct.unpack("i", payload[: struct.calcsize("i")])[0]
        try:  # by offset, as journald does: the sender's writes left the shared one at the end
            data = os.pread(fd, os.fstat(fd).st_size, 0)
        finally:
            os.close(fd)
    return parse_entry(data)


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[tuple[Path, socket.socket]]:
    """A datagram socket bound where the test tells volfs journald listens."""
    path = tmp_path / "journal.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(30)
        yield path, sock


def entry_of(sock: socket.socket, message: str, volume: str | None = None) -> dict[str, str]:
    """The first entry to arrive whose MESSAGE holds *message* (and, given *volume*, whose
    VOLUME is that); those before it are dropped."""
    while True:
        entry = receive_entry(sock)
        if message in entry["MESSAGE"] and (volume is None or entry.get("VOLUME") == volume):
            return entry


def test_daemon_and_workers_log_to_the_journal(host: Host, journal, tmp_path: Path) -> None:
    """Under systemd (JOURNAL_STREAM names our stderr), the daemon and the workers it starts
    log natively: priorities, the volume a worker serves, the identifier; nothing goes to the
    worker's log file."""
    path, sock = journal
    host.serve(journal=path)
    ready = entry_of(sock, "volfsd ready")
    assert ready["PRIORITY"] == "6" and ready["SYSLOG_IDENTIFIER"] == "volfsd"
    assert "VOLUME" not in ready  # the daemon's own record names no volume
    mnt = tmp_path / "mnt"
    host.cli("mount", "v", str(mnt))
    # The worker's record and the daemon's both name the volume.
    both = {e["LOGGER"]: e for e in (entry_of(sock, "mounted at", volume="v") for _ in range(2))}
    assert set(both) == {"volfs.worker", "volfs.supervisor"}
    mounted = both["volfs.worker"]
    assert mounted["PRIORITY"] == "6" and mounted["CODE_FUNC"] == "serve"
    host.cli("umount", str(mnt))
    assert entry_of(sock, "unmounted", volume="v")["PRIORITY"] == "6"
    assert not WORKER_LINE.search((host.root / "logs" / "v.log").read_text())


def test_journal_entries_carry_priority_fields_and_large_messages(journal) -> None:
    """The handler itself: a priority per level, VOLUME and INODE from a record, a message
    with newlines in the binary form, one too large for a datagram in a memfd."""
    path, sock = journal
    os.environ[logs.JOURNAL_SOCKET_ENV] = str(path)
    try:
        handler = logs.JournalHandler(logging.Formatter(logs.WORKER_LAYOUT))
    finally:
        del os.environ[logs.JOURNAL_SOCKET_ENV]
    logger = logging.getLogger("volfs.test_logging")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        logger.warning("inode %d: damaged", 7, extra={"volume": "v", "inode": 7})
        entry = receive_entry(sock)
        assert entry["PRIORITY"] == "4" and entry["MESSAGE"] == "inode 7: damaged"
        assert (entry["VOLUME"], entry["INODE"]) == ("v", "7")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("two\nlines")
        entry = receive_entry(sock)
        assert entry["PRIORITY"] == "3" and entry["MESSAGE"].startswith("two\nlines\nTraceback")
        logger.info("x" * 600_000)
        entry = receive_entry(sock)
        assert entry["MESSAGE"] == "x" * 600_000 and entry["PRIORITY"] == "6"
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
        handler.close()
    assert [logs.priority(level) for level in (50, 40, 30, 20, 10)] == [2, 3, 4, 6, 7]


def json_records(text: str) -> list[dict]:
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    for record in records:
        assert {"time", "level", "logger", "message", "pid"} <= set(record), record
    return records


def daemon_records(host: Host) -> list[dict]:
    """The daemon's JSON records, once it logged that it is ready (`serve` returns as soon
    as the control socket answers, which may be before)."""
    log = host.root / "logs" / "volfsd.log"
    wait_until(lambda: "volfsd ready" in log.read_text(), "the daemon's ready line")
    return json_records(log.read_text())


def test_json_format_for_the_daemon_and_its_workers(host: Host, tmp_path: Path) -> None:
    """``serve --log-format json``: every line the daemon and its worker write is one JSON
    object; the worker's name their volume."""
    host.serve("--log-format", "json")
    mnt = tmp_path / "mnt"
    host.cli("mount", "v", str(mnt))
    pid = host.worker_pid("v")
    host.cli("umount", str(mnt))
    assert any(r["message"].startswith("volfsd ready") for r in daemon_records(host))
    worker = json_records((host.root / "logs" / "v.log").read_text())
    mounted = next(r for r in worker if "mounted at" in r["message"])
    assert mounted["volume"] == "v" and mounted["pid"] == pid and mounted["level"] == "INFO"
    assert mounted["logger"] == "volfs.worker" and mounted["time"].endswith("+00:00")


def test_json_format_of_a_foreground_mount(store_root: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "fg"
    proc = subprocess.Popen(
        [sys.executable, "-m", "volfs", "mount", "-f", "--log-format", "json", "fg", str(mnt)],
        env=cli_env(store_root, run_dir_of(store_root)), stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: mounts.find_mount(mnt), "the foreground mount to appear")
    finally:
        stop_foreground(proc, mnt)
    assert proc.stderr is not None
    records = json_records(proc.stderr.read())
    assert any(r["volume"] == "fg" and "mounted at" in r["message"] for r in records)


def test_text_format_by_default(host: Host, tmp_path: Path) -> None:
    """Without a flag and outside systemd, the log files hold the text lines of before."""
    host.serve()
    mnt = tmp_path / "mnt"
    host.cli("mount", "v", str(mnt))
    pid = host.worker_pid("v")
    host.cli("umount", str(mnt))
    match = WORKER_LINE.search((host.root / "logs" / "v.log").read_text())
    assert match and int(match["pid"]) == pid
    assert DAEMON_LINE.search((host.root / "logs" / "volfsd.log").read_text())


def test_log_format_flags_and_config_checked(host: Host, tmp_path: Path) -> None:
    host.refused("serve", "--log-format", "xml", words=("invalid choice",))
    host.refused("mount", "--log-format", "json", "v", str(tmp_path / "m"),
                 words=("mount -f",))  # fmt: skip
    config = tmp_path / "volumes.toml"
    config.write_text('log_format = "yaml"\n')
    host.refused("serve", "--config", str(config), words=("log format", "text or json"))
    config.write_text('log_format = "json"\n')
    host.serve("--config", str(config))
    assert any(r["message"].startswith("volfsd ready") for r in daemon_records(host))
