"""volfsd export and import: round trips through real mounts, GNU tar, hostile archives."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import pty
import signal
import stat
import struct
import subprocess
import tarfile
import termios
import time
from pathlib import Path

import pytest
from test_damage import _pattern
from test_fsck import damage_victim, take

from volfs.errors import ErrorCode, VolfsError
from volfs.store import history
from volfs.store.root import StoreRoot

from conftest import Volume
from helpers import VOLFSD, assert_one_line_error, cli_env, volfsd, wait_until

#: Times with nanoseconds that a float would round, and one before 1970.
TIMES = (1_700_000_000_123_456_789, 1_600_000_000_987_654_321)
OLD = -86_400 * 365 * 1_000_000_000 - 7


def populate(top: Path) -> None:
    """Every kind of thing export keeps: owners, modes, ns times, links, holes, xattrs."""
    (top / "dir" / "sub").mkdir(parents=True)
    (top / "dir" / "sub" / "file").write_bytes(_pattern(3 << 20))
    (top / "empty").write_bytes(b"")
    (top / "dir" / "small").write_bytes(b"hello\n")
    os.link(top / "dir" / "small", top / "hard")
    os.symlink("../../etc/passwd", top / "dir" / "link")
    os.mkfifo(top / "fifo", 0o640)
    os.mknod(top / "null", stat.S_IFCHR | 0o620, os.makedev(1, 3))
    with open(top / "sparse", "wb") as f:  # data at 1 MiB and 9 MiB, a hole at the end
        f.seek(1 << 20)
        f.write(b"x" * 65536)
        f.seek(9 << 20)
        f.write(b"y" * 4096)
        f.truncate(16 << 20)
    os.setxattr(top / "dir" / "small", "user.note", b"\x00\xffbinary=value\n")
    os.setxattr(top / "dir", "trusted.kind", b"a directory")
    os.chown(top / "dir" / "sub" / "file", 1234, 5678)
    os.chown(top / "dir" / "link", 42, 43, follow_symlinks=False)
    os.chmod(top / "dir" / "sub", 0o2750)
    os.chmod(top / "empty", 0o4711)
    os.utime(top / "empty", ns=(OLD, OLD))
    for path in sorted(top.rglob("*"), reverse=True):  # children before their directories
        os.utime(path, ns=TIMES, follow_symlinks=False)
    os.utime(top / "empty", ns=(OLD, OLD))
    os.chmod(top, 0o751)
    os.chown(top, 1000, 1001)
    os.utime(top, ns=TIMES)


def picture(top: Path) -> dict[str, tuple]:
    """What a user sees in *top*: per path its kind and mode, owner, size, ns times, links,
    xattrs and a digest of its content (st_blocks apart: `blocks`)."""
    seen: dict[str, tuple] = {}
    for path in [top, *sorted(top.rglob("*"))]:
        st = path.lstat()
        name = "/" + str(path.relative_to(top)) if path != top else "/"
        content = target = None
        if stat.S_ISREG(st.st_mode):
            content = hashlib.blake2b(path.read_bytes()).hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            target = os.readlink(path)
        xattrs = {k: os.getxattr(path, k, follow_symlinks=False)
                  for k in os.listxattr(path, follow_symlinks=False)}  # fmt: skip
        seen[name] = (st.st_mode, st.st_uid, st.st_gid, st.st_rdev, st.st_nlink,
                      st.st_mtime_ns, None if stat.S_ISDIR(st.st_mode) else st.st_size,
                      content, target, xattrs)  # fmt: skip
    return seen


def _run(root: Path, *args: str, data: bytes) -> subprocess.CompletedProcess[bytes]:
    """``volfsd ARGS`` with *data* on its stdin."""
    return subprocess.run([*VOLFSD, *args], env=cli_env(root), input=data, capture_output=True,
                          timeout=120)  # fmt: skip


def _export(volume: Volume, out: Path) -> None:
    volfsd("export", volume.name, "-o", str(out), root=volume.root)


def test_round_trip_keeps_everything(volume, mnt, copy, tmp_path):
    populate(mnt)
    before = picture(mnt)
    volume.unmount()
    archive = tmp_path / "backup.tar"
    _export(volume, archive)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    done = volfsd("import", "copy", str(archive), root=volume.root)
    assert done.stdout == "copy\n"
    mounted = copy.mount()
    assert picture(mounted) == before
    sparse = (mounted / "sparse").stat()
    assert sparse.st_blocks * 512 <= 128 << 10, "the holes were filled"
    # the volume's settings travel in the global header
    shown = volfsd("inspect", "copy", root=volume.root).stdout
    assert '"uid": 1000' in shown and '"mode": "0751"' in shown


def test_gnu_tar_extracts_the_export_exactly(volume, mnt, tmp_path):
    populate(mnt)
    before = picture(mnt)
    volume.unmount()
    out = tmp_path / "extracted"
    out.mkdir()
    export = subprocess.run([*VOLFSD, "export", volume.name], env=cli_env(volume.root),
                            capture_output=True, check=True)  # fmt: skip
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf", "-",
                    "-C", str(out)], input=export.stdout, check=True)  # fmt: skip
    assert picture(out) == before
    assert (out / "sparse").stat().st_blocks * 512 <= 128 << 10


def test_import_from_a_directory(volume, copy, tmp_path, store_root):
    src = tmp_path / "native"
    src.mkdir()
    populate(src)
    before = picture(src)
    volfsd("import", "copy", str(src), "--size", "1G", "--label", "from=dir", root=store_root)
    assert picture(src) == before, "import changed its source"
    mounted = copy.mount()
    assert picture(mounted) == before
    assert (mounted / "sparse").stat().st_blocks * 512 <= 128 << 10
    shown = volfsd("inspect", "copy", root=store_root).stdout
    assert '"from": "dir"' in shown and '"size": 1073741824' in shown


def _tar(*members: tuple[str, str, bytes | str]) -> bytes:
    """A tar of (kind, name, data or link target) made by the standard library."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for kind, name, extra in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                assert isinstance(extra, bytes)
                info.size = len(extra)
                tar.addfile(info, io.BytesIO(extra))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                         "hardlink": tarfile.LNKTYPE, "char": tarfile.CHRTYPE}[kind]  # fmt: skip
            if kind == "char":
                info.devmajor, info.devminor = 1, 3
            info.linkname = extra if isinstance(extra, str) else ""
            tar.addfile(info)
    return buf.getvalue()


HOSTILE = {
    "dotdot": (_tar(("file", "../../escaped", b"x")), "'..' component"),
    "dotdot-inside": (_tar(("file", "a/../../escaped", b"x")), "'..' component"),
    "absolute": (_tar(("file", "/tmp/escaped", b"x")), "absolute name"),
    "beneath-symlink": (
        _tar(("symlink", "up", "/tmp"), ("file", "up/escaped", b"x")),
        "which is not a directory",
    ),
    "beneath-file": (_tar(("file", "f", b"1"), ("file", "f/escaped", b"x")), "not a directory"),
    "link-outside": (_tar(("hardlink", "h", "/etc/passwd")), "absolute name"),
    "link-missing": (_tar(("hardlink", "h", "nowhere")), "not earlier in the archive"),
    "link-up": (_tar(("hardlink", "h", "../../etc/passwd")), "'..' component"),
    "link-to-dir": (_tar(("dir", "d", ""), ("hardlink", "h", "d")), "a directory"),
    "twice": (_tar(("file", "f", b"1"), ("file", "f", b"2")), "appears twice"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_is_refused(case, store_root, tmp_path):
    data, words = HOSTILE[case]
    done = _run(store_root, "import", "evil", "-", data=data)
    assert_one_line_error(done, words, "refused")
    assert not Path("/tmp/escaped").exists()
    assert "evil" not in volfsd("ls", root=store_root).stdout
    assert [p.name for p in (store_root / "volumes").iterdir()] == []


def test_device_nodes_and_implied_directories_are_kept(volume, copy, tmp_path, store_root):
    data = _tar(("char", "deep/er/null", ""), ("symlink", "deep/up", "/"))
    assert _run(store_root, "import", "copy", "-", data=data).returncode == 0
    mounted = copy.mount()
    st = (mounted / "deep" / "er" / "null").lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert os.readlink(mounted / "deep" / "up") == "/"
    assert stat.S_IMODE((mounted / "deep").stat().st_mode) == 0o755


@pytest.mark.store_damaged("a data byte flipped on purpose")
def test_damaged_data_fails_the_export_naming_the_path(volume, mnt, tmp_path):
    damage_victim(volume, mnt)
    out = tmp_path / "out.tar"
    done = volfsd("export", volume.name, "-o", str(out), root=volume.root, check=False)
    assert_one_line_error(done, "/dir/victim", "fails its checksum")
    assert "/fine" not in done.stderr
    assert not [p for p in tmp_path.iterdir() if "out.tar" in p.name], "a partial file"


def test_refusals_are_one_line(volume, mnt, tmp_path):
    (mnt / "f").write_bytes(b"x")
    # Mounted: exported from a snapshot taken for it (tests/test_snapshots.py), none left.
    volfsd("export", volume.name, "-o", str(tmp_path / "mounted.tar"), root=volume.root)
    assert not list((volume.store / "snapshots").iterdir())
    done = volfsd("import", volume.name, str(tmp_path), root=volume.root, check=False)
    assert_one_line_error(done, "exists")
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    done = volfsd("import", "other", str(junk), root=volume.root, check=False)
    assert_one_line_error(done, "not a tar archive")
    done = volfsd("export", "ghost", root=volume.root, check=False)
    assert_one_line_error(done, "no such volume")


def test_killed_import_leaves_no_volume(store_root, tmp_path):
    head = _tar(("file", "big", b"z" * (64 << 20)))[: 40 << 20]  # cut mid-way
    proc = subprocess.Popen([*VOLFSD, "import", "big", "-"], env=cli_env(store_root),
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert proc.stdin is not None
        proc.stdin.write(head)
        proc.stdin.flush()
        staging = store_root / "volumes"
        wait_until(lambda: any((p / "volumes" / "big").glob("seg-*.log")
                               for p in staging.glob(".importing-big-*")), 30)  # fmt: skip
        time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()
        if proc.stderr is not None:
            proc.stderr.close()
    assert "big" not in volfsd("ls", root=store_root).stdout
    assert not (store_root / "volumes" / "big").exists()
    # the next import clears what the killed one left, and succeeds
    assert _run(store_root, "import", "big", "-", data=_tar(("file", "f", b"1"))).returncode == 0
    assert sorted(p.name for p in (store_root / "volumes").iterdir()) == ["big"]


def test_truncated_and_deep_archives(store_root):
    whole = _tar(("file", "f", b"z" * 100_000))
    done = _run(store_root, "import", "cut", "-", data=whole[:20_000])
    assert_one_line_error(done, "truncated")
    assert "cut" not in volfsd("ls", root=store_root).stdout
    deep = "/".join(["d"] * 1500) + "/f"  # deeper than Python's recursion limit
    assert _run(store_root, "import", "deep", "-", data=_tar(("file", deep, b"1"))).returncode == 0
    done = volfsd("fsck", "deep", root=store_root)
    assert "1502 inodes" in done.stdout


def test_progress_bar_only_on_a_terminal(store_root, tmp_path):
    volfsd("create", "fresh", "--uid", "5", root=store_root)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a real width
    try:
        done = subprocess.run([*VOLFSD, "export", "fresh", "-o", str(tmp_path / "a.tar")],
                              env=cli_env(store_root), stderr=slave, timeout=60)  # fmt: skip
        os.close(slave)
        slave = -1
        assert done.returncode == 0
        shown = b""
        with contextlib.suppress(OSError):  # EIO once the terminal's writers are gone
            while chunk := os.read(master, 4096):
                shown += chunk
        assert b"export fresh" in shown
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    quiet = volfsd("export", "fresh", "-o", str(tmp_path / "b.tar"), root=store_root)
    assert quiet.stderr == ""
    with tarfile.open(tmp_path / "b.tar") as tar:
        root = tar.getmember(".")
        assert root.uid == 5 and root.mtime > 1_700_000_000  # the creation time, not 1970
        assert tar.pax_headers["volfs.uid"] == "5"


def _changed_after_the_snapshot(mnt: Path) -> None:
    (mnt / "dir" / "small").write_bytes(b"changed\n")
    os.unlink(mnt / "hard")
    (mnt / "dir" / "sub" / "file").unlink()
    (mnt / "new").write_bytes(b"made after the snapshot")
    os.chmod(mnt, 0o700)


def test_export_of_a_snapshot_has_its_contents_while_the_volume_changes(
    volume, mnt, copy, tmp_path
):
    populate(mnt)
    before = picture(mnt)
    volume.unmount()
    take(volume, "then")
    mnt = volume.mount()
    _changed_after_the_snapshot(mnt)
    archive = tmp_path / "then.tar"
    volfsd("export", "testvol@then", "-o", str(archive), root=volume.root)  # while mounted
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    out = tmp_path / "extracted"
    out.mkdir()
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf",
                    str(archive), "-C", str(out)], check=True)  # fmt: skip
    assert picture(out) == before
    assert (out / "sparse").stat().st_blocks * 512 <= 128 << 10
    with tarfile.open(archive) as tar:  # the volume's settings header, as a volume export's
        assert tar.pax_headers["volfs.name"] == "testvol"
        assert tar.pax_headers["volfs.mode"] == "0751" and tar.pax_headers["volfs.uid"] == "1000"
    volume.unmount()
    volfsd("import", "copy", str(archive), root=volume.root)
    assert picture(copy.mount()) == before


def test_an_exported_snapshot_cannot_be_removed_meanwhile(volume, mnt, tmp_path):
    (mnt / "big").write_bytes(_pattern(4 << 20))
    volume.unmount()
    take(volume, "held")
    store = StoreRoot(volume.root)
    header = volume.store / "snapshots" / "held" / "snapshot"

    def shared_lock_taken() -> bool:
        fd = os.open(header, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    # Its stdout a pipe nobody reads yet: the export stops with the snapshot loaded.
    proc = subprocess.Popen([*VOLFSD, "export", "testvol@held"], env=cli_env(volume.root),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        wait_until(shared_lock_taken, "the export to hold the snapshot")
        with pytest.raises(VolfsError) as refused:
            history.remove(store, volume.name, "held")
        assert refused.value.code is ErrorCode.BUSY
        archive, errors = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, errors
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        assert tar.extractfile("big").read() == _pattern(4 << 20)
    history.remove(store, volume.name, "held")  # the export is done: it may go now
    assert history.names(store, volume.name) == []


def test_snapshot_export_refusals_are_one_line(volume, mnt, tmp_path):
    volume.unmount()
    done = volfsd("export", "testvol@nope", "-o", str(tmp_path / "a.tar"), root=volume.root,
                  check=False)  # fmt: skip
    assert_one_line_error(done, "no such snapshot: testvol@nope")
    done = volfsd("export", "ghost@nope", root=volume.root, check=False)
    assert_one_line_error(done, "no such volume: ghost")
    done = volfsd("export", "testvol@", root=volume.root, check=False)
    assert_one_line_error(done, "invalid snapshot name")
    assert not list(tmp_path.glob("*.tar*"))
