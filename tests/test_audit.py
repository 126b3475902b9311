"""The checks after each test (tests/audit.py) find what they are there to find."""

from __future__ import annotations

import os
from pathlib import Path

from test_damage import _flip
from test_fsck import take

import audit

WORKER_LOG = """\
2026-12-01 12:00:00,001 volfsd[7] INFO volfs.worker: volume v mounted at /m (pid 7)
2026-12-01 12:00:00,002 volfsd[7] ERROR volfs.fsops: volume v: read failed
Traceback (most recent call last):
  File "volfs/fsops.py", line 1, in read
KeyError: 3
2026-12-01 12:00:00,003 volfsd[7] WARNING volfs.store.volume: volume v: cut a torn tail
"""


def _store_with_log(tmp_path: Path, name: str, text: str) -> Path:
    root = tmp_path / "store"
    (root / "logs").mkdir(parents=True)
    (root / "logs" / name).write_text(text)
    return root


def test_an_error_with_its_traceback_is_one_fault(tmp_path):
    root = _store_with_log(tmp_path, "v.log", WORKER_LOG)
    faults = audit.log_faults(root)
    assert len(faults) == 1 and faults[0].startswith("v.log: ") and "KeyError: 3" in faults[0]
    assert audit.log_faults(root, ["read failed"]) == []  # declared by the test
    assert audit.log_faults(root, ["mounted at"]) == faults  # a pattern of another record


def test_a_traceback_outside_logging_is_a_fault(tmp_path):
    crash = "Traceback (most recent call last):\n  File 'x', line 1\nSystemError: boom\n"
    assert len(audit.log_faults(_store_with_log(tmp_path, "v.log", crash))) == 1
    assert audit.log_faults(_store_with_log(tmp_path / "2", "v.log", "a warning line\n")) == []


def test_fd_growth_is_found_and_deleted_files_too(tmp_path):
    watch = audit.FdWatch(os.getpid())
    watch.check()
    held = [os.open(tmp_path, os.O_RDONLY) for _ in range(audit.FD_ALLOWANCE + 1)]
    try:
        try:
            watch.check()
        except AssertionError as exc:
            assert str(tmp_path) in str(exc)
        else:
            raise AssertionError("a growth past the allowance passed")
    finally:
        for fd in held:
            os.close(fd)
    watch.check()
    (tmp_path / "gone").write_bytes(b"x")
    fd = os.open(tmp_path / "gone", os.O_RDONLY)
    os.unlink(tmp_path / "gone")
    try:
        try:
            watch.check()
        except AssertionError as exc:
            assert "deleted" in str(exc)
        else:
            raise AssertionError("a deleted file held open passed")
    finally:
        os.close(fd)


def test_a_damaged_store_is_found(volume, mnt):
    (mnt / "f").write_bytes(b"x" * 100_000)
    volume.unmount()
    assert audit.store_problems(volume.root) == []
    segment = next(volume.store.glob("seg-*.log"))
    with open(segment, "r+b") as f:
        f.seek(-1000, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1000, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    problems = audit.store_problems(volume.root)
    assert len(problems) == 1 and "/f: damaged data" in problems[0]
    with open(segment, "r+b") as f:  # mended: the fixture's own check finds it clean
        f.seek(-1000, os.SEEK_END)
        f.write(byte)


def test_a_damaged_snapshot_is_found(volume, mnt):
    """Damage only a snapshot still reaches (the volume removed the file) is found, named."""
    (mnt / "f").write_bytes(b"x" * 100_000)
    volume.unmount()
    take(volume, "old")
    os.unlink(volume.mount() / "f")
    volume.unmount()
    assert audit.store_problems(volume.root) == []
    segment = next((volume.store / "snapshots" / "old").glob("seg-*.log"))
    with open(segment, "r+b") as f:
        at = f.read().index(b"x" * 1000) + 10
    _flip(segment, at)
    problems = audit.store_problems(volume.root)
    assert len(problems) == 1 and problems[0].startswith("snapshot testvol@old: /f: damaged data")
    _flip(segment, at)  # mended: the fixture's own check finds it clean
