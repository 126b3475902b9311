"""The CLI's mount and umount, and every refusal: one line on stderr, exit status 1 (2 for
fsck and scrub), and internal errors that name the file holding their traceback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile

import pytest

from volfs import mounts

from helpers import assert_one_line_error as refused
from helpers import needs_root, run_dir_of, stop_daemon, stop_foreground, volfsd, wait_until


@pytest.mark.parametrize("name", ["", "UPPER", "../escape", "a/b", "-dash", "x" * 64, "sp ace"])
def test_bad_volume_names(store_root, tmp_path, name):
    done = volfsd("mount", "--", name, str(tmp_path / "m"), root=store_root, check=False)
    refused(done, "invalid volume name")


def test_relative_mountpoint(store_root):
    refused(volfsd("mount", "v", "relative/path", root=store_root, check=False), "absolute")


def test_nonempty_mountpoint(store_root, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "existing").write_text("x")
    refused(volfsd("mount", "v", str(tmp_path / "m"), root=store_root, check=False), "not empty")


def test_mountpoint_is_a_file(store_root, tmp_path):
    (tmp_path / "f").write_text("x")
    refused(volfs_mount := volfsd("mount", "v", str(tmp_path / "f"), root=store_root, check=False))
    assert "not a directory" in volfs_mount.stderr


def test_second_server_refused(volume, mnt, tmp_path):
    """Serving a volume the daemon serves, from another process, is refused."""
    done = volfsd("mount", "-f", volume.name, str(tmp_path / "other"), root=volume.root,
                  check=False)  # fmt: skip
    refused(done, "already being served", str(volume.pid))


def test_mount_on_a_mount_point_refused(volume, mnt, tmp_path):
    done = volfsd("mount", "another", str(mnt), root=volume.root, check=False)
    refused(done, "already a mount point")


def test_umount_of_something_else(store_root, tmp_path):
    refused(volfsd("umount", str(tmp_path), root=store_root, check=False), "not a volfs mount")
    refused(volfsd("umount", "rel", root=store_root, check=False), "absolute")


def test_umount_busy(volume, mnt):
    with open(mnt / "f", "w"):
        refused(volfsd("umount", str(mnt), root=volume.root, check=False), "busy")
    volume.unmount()


def test_store_root_missing_parent(tmp_path):
    done = volfsd("mount", "v", str(tmp_path / "m"), root=tmp_path / "no" / "such", check=False)
    refused(done, "does not exist")


def test_store_root_newer_format(store_root, tmp_path):
    store_root.mkdir()
    (store_root / "FORMAT").write_text("volfs-store 99\n")
    refused(volfsd("mount", "v", str(tmp_path / "m"), root=store_root, check=False), "upgrade")


@needs_root("needs root for a read-only bind mount")
def test_store_root_not_writable(tmp_path):
    root = tmp_path / "readonly"
    (root / "volumes").mkdir(parents=True)
    subprocess.run(["mount", "--bind", "-o", "ro", str(root), str(root)], check=True)
    try:
        done = volfsd("mount", "v", str(tmp_path / "m"), root=root, check=False)
    finally:
        subprocess.run(["umount", str(root)], check=True)
    refused(done, "not writable")


@pytest.mark.store_damaged("a header of a newer format, which this volfs cannot check")
def test_volume_header_newer_format(volume, mnt):
    volume.unmount()
    header = volume.store / "volume"
    from volfs.store import frame

    header.write_bytes(b"".join(frame.encode({"kind": "volfs-volume", "format": 7})))
    done = volfsd("mount", volume.name, str(volume.store.parent.parent / "m9"),
                  root=volume.root, check=False)  # fmt: skip
    refused(done, "upgrade")


def test_dead_mount_is_cleared_by_the_next_mount(store_root, tmp_path):
    """A foreground server killed with SIGKILL leaves a dead mount; mount clears it."""
    mnt = tmp_path / "fg"
    proc = _foreground(store_root, "fgvol", mnt)
    try:
        (mnt / "f").write_bytes(b"kept")
        proc.kill()
        proc.wait()
        assert mounts.find_mount(mnt) is not None  # the dead mount is still there
        with pytest.raises(OSError):
            os.stat(mnt / "f")
        volfsd("mount", "fgvol", str(mnt), root=store_root)
        assert (mnt / "f").read_bytes() == b"kept"
    finally:
        stop_daemon(run_dir_of(store_root))
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if mounts.find_mount(mnt) is not None:
            mounts.detach(mnt, lazy=True)


def _foreground(store_root, name: str, mnt) -> subprocess.Popen:
    env = {
        **os.environ,
        "VOLFS_ROOT": str(store_root),
        "VOLFS_RUN_DIR": str(run_dir_of(store_root)),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "volfs", "mount", "-f", name, str(mnt)],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_until(lambda: mounts.find_mount(mnt), "the foreground mount to appear")
    return proc


def test_umount_busy_names_the_users(store_root, tmp_path):
    """Unmounting a foreground mount that a process uses names that process."""
    mnt = tmp_path / "fg"
    proc = _foreground(store_root, "fgvol", mnt)
    holder = None
    try:
        (mnt / "f").write_bytes(b"held")
        with open(mnt / "f") as f:
            holder = subprocess.Popen(["sleep", "120"], stdin=f, cwd="/")
        done = volfsd("umount", str(mnt), root=store_root, check=False)
        refused(done, f"is busy (used by pid {holder.pid} (sleep, open file))", "--lazy")
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        stop_foreground(proc, mnt)


def test_foreground_mount_and_sigterm(store_root, tmp_path):
    mnt = tmp_path / "fg"
    proc = _foreground(store_root, "fgvol", mnt)
    try:
        (mnt / "f").write_bytes(b"foreground")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert mounts.find_mount(mnt) is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if mounts.find_mount(mnt) is not None:
            mounts.detach(mnt, lazy=True)


# -- version, exit statuses, internal errors -----------------------------------------------------


def test_version(store_root):
    import importlib.metadata

    import volfs
    from volfs import pyfuse3_build

    done = volfsd("--version", root=store_root)
    # and the pyfuse3 build (tests/test_pyfuse3_patches.py checks it names this series)
    assert done.stdout == f"volfsd {volfs.__version__}, {pyfuse3_build.describe()}\n"
    assert volfs.__version__ == importlib.metadata.version("volfs")  # one version, not two


#: A failing call of every command but fsck and scrub: each exits 1 with one line.
FAILURES = [
    ("create", "Bad/Name"),
    ("create", "v", "--size", "lots"),
    ("inspect", "ghost"),
    ("mount", "v", "relative"),
    ("umount", "/"),
    ("rm", "ghost"),
    ("status",),
    ("serve", "--config", "/nonexistent/volumes.toml"),
    (),
    ("frobnicate",),
    ("ls", "--format", "xml"),
]


@pytest.mark.parametrize("args", FAILURES, ids=" ".join)
def test_every_other_failure_exits_1(store_root, args):
    refused(volfsd(*args, root=store_root, check=False))


def test_ls_of_an_unusable_store_exits_1(store_root):
    store_root.mkdir()
    (store_root / "FORMAT").write_text("volfs-store 99\n")
    refused(volfsd("ls", root=store_root, check=False), "upgrade")


#: fsck and scrub exit 1 only for damage found; whatever keeps them from checking exits 2.
UNCHECKED = [
    ("fsck", "ghost"),
    ("scrub", "ghost"),
    ("fsck", "Bad/Name"),
    ("fsck",),
    ("scrub", "ghost", "--rate", "fast"),
    ("fsck", "ghost", "--bogus"),
]


@pytest.mark.parametrize("args", UNCHECKED, ids=" ".join)
def test_check_failures_exit_2(store_root, args):
    done = volfsd(*args, root=store_root, check=False)
    assert done.returncode == 2, done
    assert done.stderr.startswith("volfsd: ") and done.stderr.count("\n") == 1, done.stderr


@pytest.mark.expect_log("RuntimeError: a bug")
def test_cli_internal_error_names_its_log(store_root, monkeypatch, capsys):
    """A bug in the CLI is one line naming the file that holds its traceback."""
    from volfs import cli

    def broken(args):
        raise RuntimeError("a bug\nwith a second line")

    volfsd("create", "v", root=store_root)
    monkeypatch.setenv("VOLFS_ROOT", str(store_root))
    monkeypatch.setattr(cli, "cmd_ls", broken)
    assert cli.main(["ls"]) == 1
    assert cli.main(["fsck", "v"]) == 0  # only ls is broken
    capsys.readouterr()
    monkeypatch.setattr(cli, "cmd_fsck", broken)
    assert cli.main(["fsck", "v"]) == 2
    err = capsys.readouterr().err
    log_file = store_root / "logs" / cli.CLI_LOG
    assert err == f"volfsd: internal error (RuntimeError: a bug); the traceback is in {log_file}\n"
    text = log_file.read_text()
    assert "volfsd ls: internal error" in text and "volfsd fsck v: internal error" in text
    assert "Traceback" in text and 'raise RuntimeError("a bug' in text
    assert log_file.stat().st_mode & 0o777 == 0o600
    # Without a store root to log into, the traceback goes to stderr.
    monkeypatch.setenv("VOLFS_ROOT", str(store_root.parent / "nowhere"))
    assert cli.main(["ls"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("volfsd: internal error (RuntimeError: a bug); traceback:\n")
    assert "Traceback" in err
    assert not (store_root.parent / "nowhere").exists()


_FAKE_DAEMON = """
import os, socket, struct, sys, msgpack
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.bind(sys.argv[1] + "/volfsd.sock")
sock.listen(8)
open(sys.argv[1] + "/volfsd.pid", "w").write(f"{os.getpid()}\\n")
print("ready", flush=True)
while True:
    conn, _ = sock.accept()
    conn.recv(65536)
    body = msgpack.packb({"ok": False, "error": "internal error in volfsd; see its log",
                          "code": "internal"})  # fmt: skip
    conn.sendall(struct.pack(">I", len(body)) + body)
    conn.close()
"""


def test_daemon_internal_error_names_its_log(store_root):
    """The daemon's reply to a request that hit a bug names no log: the CLI names it."""
    run = run_dir_of(store_root)
    run.mkdir(parents=True)
    log_file = store_root.parent / "daemon.log"
    with open(log_file, "w") as err:
        # A stand-in that answers every request as volfsd does when a request hits a bug.
        proc = subprocess.Popen([sys.executable, "-c", _FAKE_DAEMON, str(run)],
                                stdout=subprocess.PIPE, stderr=err, text=True)  # fmt: skip
    try:
        assert proc.stdout.readline() == "ready\n"
        done = volfsd("ls", root=store_root, check=False)
        refused(done, f"internal error in volfsd; the traceback is in {log_file}")
    finally:
        proc.kill()
        proc.wait()


def test_log_destination():
    """Where a process logs: its stderr's file, the journal (JOURNAL_STREAM) or the stream."""
    from volfs.control import log_destination

    with tempfile.NamedTemporaryFile() as f:
        proc = subprocess.Popen(["sleep", "60"], stderr=f)
        try:
            assert log_destination(proc.pid) == f.name
        finally:
            proc.kill()
            proc.wait()
    left, right = socket.socketpair()
    with left, right:
        st = os.fstat(left.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        proc = subprocess.Popen(["sleep", "60"], stderr=left, env=env)
        other = subprocess.Popen(["sleep", "60"], stderr=left)  # a socket, but no journal
        try:
            assert log_destination(proc.pid) == "the journal (journalctl -u volfsd)"
            assert log_destination(other.pid).startswith(f"the stderr of process {other.pid}")
        finally:
            for p in (proc, other):
                p.kill()
                p.wait()
