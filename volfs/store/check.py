"""Checking a volume offline: what `volfsd fsck` reports.

Opening a volume already verifies every record it replays (and cuts a torn tail); this module
checks the rest: every block of live data against its checksum, the directory tree against the
inodes, link counts, sizes against extent maps, and the per-segment accounting.
"""

from __future__ import annotations

import stat
import time
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

from volfs.errors import DataDamaged
from volfs.store.volume import ROOT_INO, Volume


class Problem(NamedTuple):
    path: str
    what: str


def paths_of(volume: Volume) -> dict[int, str]:
    """A path for each inode reachable from the root (the first found, for hard links)."""
    paths = {ROOT_INO: "/"}
    pending = [ROOT_INO]
    while pending:
        ino = pending.pop()
        directory = volume.inodes[ino]
        for name, child in directory.entries.names():
            if child in paths:
                continue
            prefix = "" if ino == ROOT_INO else paths[ino]
            paths[child] = f"{prefix}/{name.decode(errors='backslashreplace')}"
            if volume.inodes[child].entries is not None:
                pending.append(child)
    return paths


def check(volume: Volume, progress: Callable[[int], None] | None = None) -> list[Problem]:
    """Every problem found in *volume*; *progress* gets the bytes of data verified so far."""
    problems: list[Problem] = []
    paths = paths_of(volume)
    links: Counter[int] = Counter()
    subdirs: Counter[int] = Counter()
    for inode in volume.inodes.values():
        if inode.entries is not None:
            for _name, child in inode.entries.names():
                links[child] += 1
                if volume.inodes[child].entries is not None:
                    subdirs[inode.ino] += 1
                    if volume.inodes[child].parent != inode.ino:
                        problems.append(Problem(paths.get(child, f"inode {child}"),
                                                "directory's parent link is wrong"))  # fmt: skip
    live: Counter[int] = Counter()
    verified = 0
    for inode in volume.inodes.values():
        where = paths.get(inode.ino, f"inode {inode.ino}")
        if inode.ino not in paths:
            problems.append(Problem(where, "not reachable from the root (orphan)"))
        expected = 2 + subdirs[inode.ino] if inode.entries is not None else links[inode.ino]
        if inode.nlink != expected:
            problems.append(Problem(where, f"link count {inode.nlink}, expected {expected}"))
        if stat.S_ISLNK(inode.mode) and inode.size != len(inode.target or b""):
            problems.append(Problem(where, "symlink size differs from its target"))
        if inode.extents is None:
            continue
        for ext in inode.extents:
            live[ext.frame.seg] += ext.length
            if ext.start + ext.length > inode.size:
                problems.append(Problem(where, f"data beyond the file size at {ext.start}"))
            if ext.frame.seg not in volume.log.segments:
                problems.append(Problem(where, f"data in missing segment {ext.frame.seg}"))
                continue
            try:
                volume.read_extent(inode, ext)
            except DataDamaged:
                end = ext.start + ext.length
                problems.append(Problem(where, f"damaged data in bytes {ext.start}-{end}"))
            verified += ext.length
            if progress is not None:
                progress(verified)
    for seg, used in volume.live.items():
        if used != live.get(seg, 0):
            problems.append(Problem("(store)", f"segment {seg} accounting {used} != {live[seg]}"))
    return problems


def repair(volume: Volume, problems: list[Problem]) -> list[str]:
    """Fix what needs no guessing: link orphans into /lost+found.  Returns what changed.

    Link counts and accounting are recomputed from the tree whenever a volume is loaded, so a
    checkpoint (taken when the repaired volume closes) settles them.  Damaged data is left:
    only the file's owner knows what it should hold, and reads keep reporting EIO.
    """
    changes = []
    orphans = [p for p in problems if p.what.startswith("not reachable")]
    if not orphans:
        return changes
    root = volume.inodes[ROOT_INO]
    lost_ino = root.entries.get(b"lost+found")
    if lost_ino is None:
        lost = volume.new_inode(stat.S_IFDIR | 0o700, 0, 0, 0, time.time_ns())
        volume.create(root, b"lost+found", lost, time.time_ns())
        lost_ino = lost.ino
        changes.append("created /lost+found")
    lost = volume.inodes[lost_ino]
    for problem in orphans:
        ino = int(problem.path.split()[-1])
        inode = volume.inodes[ino]
        volume.link(inode, lost, b"#%d" % ino, time.time_ns())
        changes.append(f"inode {ino} linked as /lost+found/#{ino}")
    return changes
