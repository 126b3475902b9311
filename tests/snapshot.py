"""A comparable picture of a directory tree: what persistence tests compare before and after."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path


def snapshot(top: Path, times: bool = True) -> dict[str, tuple]:
    """Map each path under *top* to its type, mode, owner, size, content, links and xattrs.

    Hard links show as the same "link group" (the first path seen with that inode), so the
    picture does not depend on inode numbers, which differ between file systems.
    """
    picture: dict[str, tuple] = {}
    groups: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = str(path.relative_to(top))
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            else:
                content = None
            group = groups.setdefault(st.st_ino, rel) if stat.S_ISREG(st.st_mode) else rel
            follow = not stat.S_ISLNK(st.st_mode)
            xattrs = (
                tuple(sorted((n, os.getxattr(path, n)) for n in os.listxattr(path)))
                if follow
                else ()
            )
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
            mtime = st.st_mtime_ns if times and not stat.S_ISLNK(st.st_mode) else None
            picture[rel] = (
                kind,
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                size,
                st.st_nlink,
                group,
                content,
                xattrs,
                st.st_rdev,
                mtime,
            )
    return picture
