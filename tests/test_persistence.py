"""What is written survives unmount and remount elsewhere, byte for byte."""

from __future__ import annotations

import os
import stat

from snapshot import snapshot


def populate(top) -> None:
    os.makedirs(top / "a" / "b" / "c")
    (top / "a" / "small").write_bytes(b"small file")
    (top / "a" / "b" / "random").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    with open(top / "sparse", "wb") as f:
        f.seek(10 << 20)
        f.write(b"after a hole")
    os.link(top / "a" / "small", top / "a" / "b" / "c" / "hardlink")
    os.symlink("../a/small", top / "a" / "b" / "symlink")
    os.symlink("/dangling/target", top / "dangling")
    os.mkfifo(top / "fifo", 0o640)
    os.mknod(top / "chardev", 0o600 | stat.S_IFCHR, os.makedev(1, 7))
    os.setxattr(top / "a" / "small", "user.colour", b"blue")
    os.setxattr(top / "a", "user.dir", b"\x00\x01")
    os.chmod(top / "a" / "b", 0o2750)
    os.chown(top / "a" / "b" / "random", 1234, 5678)
    os.utime(top / "a" / "small", ns=(1_600_000_000_111_222_333, 1_650_000_000_444_555_666))
    for i in range(300):
        (top / "a" / "b" / "c" / f"many-{i}").write_bytes(b"%d" % i * i)
    os.unlink(top / "a" / "b" / "c" / "many-7")
    os.rename(top / "a" / "b" / "c" / "many-8", top / "renamed")


def test_tree_survives_remount(volume, mnt):
    populate(mnt)
    before = snapshot(mnt)
    again = volume.remount()
    assert again != mnt
    assert snapshot(again) == before
    # and a second generation: change after remount, remount again
    (again / "a" / "small").write_bytes(b"changed")
    os.rename(again / "renamed", again / "a" / "renamed")
    before = snapshot(again)
    assert snapshot(volume.remount()) == before


def test_many_remounts_keep_growing_tree(volume, mnt):
    path = mnt
    expected = {}
    for round_ in range(5):
        for i in range(20):
            name = f"r{round_}-{i}"
            data = os.urandom(1000 + round_ * 5000 + i)
            (path / name).write_bytes(data)
            expected[name] = data
        path = volume.remount()
        assert {p.name: p.read_bytes() for p in path.iterdir()} == expected
