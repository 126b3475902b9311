import contextlib
import os


def test_write_read_remount(volume, mnt):
    (mnt / "a").write_bytes(b"hello")
    assert (mnt / "a").read_bytes() == b"hello"
    new = volume.remount()
    assert (new / "a").read_bytes() == b"hello"
    assert os.listdir(new) == ["a"]


def test_kill(volume, mnt):
    fd = os.open(mnt / "f", os.O_WRONLY | os.O_CREAT)
    os.write(fd, b"x" * 10000)
    volume.kill()
    with contextlib.suppress(OSError):
        os.close(fd)
    new = volume.mount()
    assert (new / "f").read_bytes() == b"x" * 10000
