"""Checking a volume: the problems `volfsd fsck` and `volfsd scrub` report, and repair.

The checks run on a `ReadOnlyState` (`volfs.store.readonly`) or on a served `Volume` (tests).  Each
problem has a kind (`ProblemKind`), which `--repair` and programs decide on, and the inode it
concerns; its text is for people.  The damage found while the snapshot loaded comes first, each
named by the files the damaged frame seems to concern; then every block of live data is
verified and, when the metadata is whole, the directory tree is checked against the inodes,
link counts, sizes and the per-segment accounting.
"""

from __future__ import annotations

import enum
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import NamedTuple

from volfs.store import frame
from volfs.store.extents import Extent
from volfs.store.log import LogDamage
from volfs.store.naming import join_path
from volfs.store.readonly import ReadOnlyState, SegmentGone, concerned_inodes
from volfs.store.state import ROOT_INO, VolumeState, dir_entries
from volfs.store.volume import Volume

#: Files named, at most, for one damaged frame (a checkpoint frame holds 4096 records).
MAX_NAMED = 20


class ProblemKind(enum.StrEnum):
    """What is wrong; what `--repair` and programs decide on (the text is for people)."""

    CHECKSUM = "checksum"  #: file data fails its checksums
    MISSING_SEGMENT = "missing-segment"  #: a log segment that data or metadata needs is gone
    METADATA = "metadata"  #: a checkpoint or log frame of metadata fails its checks
    UNFIT_RECORD = "unfit-record"  #: records that do not fit the volume's state
    UNREACHABLE = "unreachable"  #: an inode that no directory reaches (an orphan)
    LINK_COUNT = "link-count"  #: a link count that differs from the tree
    PARENT = "parent"  #: a directory whose parent link is wrong
    SIZE = "size"  #: a size that does not fit the data (a symlink's, data past the end)
    ACCOUNTING = "accounting"  #: the per-segment or volume-wide figures differ from a recount


class Problem(NamedTuple):
    path: str  #: the file it concerns, or "inode N", or "(store)"
    what: str  #: what is wrong, for people
    kind: ProblemKind
    ino: int | None = None  #: the inode it concerns, if one


class Report(NamedTuple):
    problems: list[Problem]
    verified: int  #: bytes of live data whose blocks were verified
    moved: int  #: bytes of live data compaction moved away before they could be read
    notes: list[str]


# -- naming ------------------------------------------------------------------------------------


def paths_of(volume: VolumeState) -> dict[int, str]:
    """A path for each inode reachable from the root (the first found, for hard links)."""
    paths = {ROOT_INO: "/"}
    pending = [ROOT_INO]
    while pending:
        ino = pending.pop()
        for name, child in dir_entries(volume.inodes[ino]).items():
            inode = volume.inodes.get(child)
            if child in paths or inode is None:
                continue
            paths[child] = join_path(paths[ino], name)
            if inode.entries is not None:
                pending.append(child)
    return paths


def _damage_problems(volume: ReadOnlyState, paths: dict[int, str]) -> list[Problem]:
    """The damage found while loading, each named by the files it concerns where possible."""
    abouts = [concerned_inodes(d.records) for d in volume.damage]
    links = dict(volume.lost_links)
    for _inos, named in abouts:
        links.update(named)

    def name(ino: int, depth: int = 0) -> str:
        if ino in paths:
            return paths[ino]
        if ino in links and depth < 256:
            parent, entry = links[ino]
            prefix = name(parent, depth + 1)
            if prefix.startswith("/"):
                return join_path(prefix, entry)
        return f"inode {ino}"

    problems = []
    for damage, (inos, _links) in zip(volume.damage, abouts, strict=True):
        kind = ProblemKind.METADATA if damage.missing is None else ProblemKind.MISSING_SEGMENT
        concerned = sorted({name(ino): ino for ino in inos}.items())
        if not concerned:
            what = f"{damage.what}; what it held is unreadable"
            problems.append(Problem("(store)", what, kind))
        for path, ino in concerned[:MAX_NAMED]:
            problems.append(Problem(path, f"metadata damaged: {damage.what}; the frame names "
                                          "this file (read without its checksum)",
                                    kind, ino))  # fmt: skip
        if len(concerned) > MAX_NAMED:
            problems.append(Problem("(store)", f"{len(concerned) - MAX_NAMED} more files are named "
                                               f"in the damaged frame: {damage.what}",
                                    kind))  # fmt: skip
    if volume.unfit:
        problems.append(Problem("(store)", f"{len(volume.unfit)} record(s) do not fit the volume,"
                                           f" the first {volume.unfit[0]}",
                                ProblemKind.UNFIT_RECORD))  # fmt: skip
    return problems


# -- checking ----------------------------------------------------------------------------------


def _tree_problems(volume: VolumeState, paths: dict[int, str]) -> list[Problem]:
    """The tree against the inodes, link counts, sizes, and the per-segment accounting."""
    problems: list[Problem] = []
    links: Counter[int] = Counter()
    subdirs: Counter[int] = Counter()
    for inode in volume.inodes.values():
        for _name, child in inode.entries.items() if inode.entries is not None else ():
            links[child] += 1
            child_inode = volume.inodes.get(child)
            if child_inode is not None and child_inode.entries is not None:
                subdirs[inode.ino] += 1
                if child_inode.parent != inode.ino:
                    problems.append(Problem(paths.get(child, f"inode {child}"),
                                            "directory's parent link is wrong",
                                            ProblemKind.PARENT, child))  # fmt: skip
    live: Counter[int] = Counter()
    for inode in volume.inodes.values():
        where, ino = paths.get(inode.ino, f"inode {inode.ino}"), inode.ino
        if inode.ino not in paths:
            what = "not reachable from the root (orphan)"
            problems.append(Problem(where, what, ProblemKind.UNREACHABLE, ino))
        expected = 2 + subdirs[inode.ino] if inode.entries is not None else links[inode.ino]
        if inode.nlink != expected:
            what = f"link count {inode.nlink}, expected {expected}"
            problems.append(Problem(where, what, ProblemKind.LINK_COUNT, ino))
        if stat.S_ISLNK(inode.mode) and inode.size != len(inode.target or b""):
            what = "symlink size differs from its target"
            problems.append(Problem(where, what, ProblemKind.SIZE, ino))
        for ext in inode.extents or ():
            live[ext.frame.seg] += ext.length
            if ext.start + ext.length > inode.size:
                what = f"data beyond the file size at {ext.start}"
                problems.append(Problem(where, what, ProblemKind.SIZE, ino))
    for seg, used in volume.live.items():
        if used != live.get(seg, 0):
            what = f"segment {seg} accounting {used} != {live[seg]}"
            problems.append(Problem("(store)", what, ProblemKind.ACCOUNTING))
    counted = volume.recount()
    kept = {s: n for s, n in volume.extents_in.items() if n}
    for seg in sorted(set(kept) | set(counted["extents_in"])):
        have, want = kept.get(seg, 0), counted["extents_in"].get(seg, 0)
        if have != want:
            what = f"segment {seg} extent count {have} != {want}"
            problems.append(Problem("(store)", what, ProblemKind.ACCOUNTING))
    for key in ("extent_count", "meta_used", "used"):
        have, want = getattr(volume, key), counted[key]
        if have != want:
            what = f"accounting of {key}: {have} != {want}"
            problems.append(Problem("(store)", what, ProblemKind.ACCOUNTING))
    return problems


def _bad_blocks(volume: VolumeState, ext: Extent) -> list[tuple[int, int, int, int]]:
    """(start, end, segment, offset) of each block of *ext* that fails its checksum: the file
    bytes of the extent in that block, and where the block lies in the log."""
    fr, size = ext.frame, frame.BLOCK_SIZE
    first, last = ext.skip // size, (ext.skip + ext.length - 1) // size
    try:
        length = min(fr.length, (last + 1) * size) - first * size
        bad = frame.bad_blocks(volume.log.read(fr.seg, fr.pos + first * size, length), first,
                               fr.sums)  # fmt: skip
    except (LogDamage, IndexError):  # the segment ends early; fewer sums than blocks
        bad = list(range(first, last + 1))
    base = ext.start - ext.skip  # the file offset of the frame's first byte
    return [
        (max(ext.start, base + b * size), min(ext.start + ext.length, base + (b + 1) * size),
         fr.seg, fr.pos + b * size)
        for b in bad
    ]  # fmt: skip


def _ranges(where: str, ino: int, bad: list[tuple[int, int, int, int]]) -> Iterator[Problem]:
    """One problem per run of adjacent damaged bytes of a file."""
    runs: list[list[int]] = []
    for start, end, seg, pos in sorted(bad):
        if runs and runs[-1][1] == start:
            runs[-1][1] = end
            runs[-1][4] += 1
        else:
            runs.append([start, end, seg, pos, 1])
    for start, end, seg, pos, blocks in runs:
        place = f"segment {seg} offset {pos}"
        place = f"block at {place}" if blocks == 1 else f"{blocks} blocks, the first at {place}"
        what = f"damaged data in bytes {start}-{end} (inode {ino}; {place})"
        yield Problem(where, what, ProblemKind.CHECKSUM, ino)


def check(volume: VolumeState, progress: Callable[[int], None] | None = None) -> list[Problem]:
    """Every problem found in *volume*, a served `Volume` or a `ReadOnlyState`."""
    return examine(volume, progress).problems


def examine(volume: VolumeState, progress: Callable[[int], None] | None = None) -> Report:
    """Check *volume*; *progress* gets the bytes of data done so far."""
    snapshot = volume if isinstance(volume, ReadOnlyState) else None
    paths = paths_of(volume)
    problems = _damage_problems(snapshot, paths) if snapshot is not None else []
    notes = []
    if problems:
        notes.append("the tree, link counts and accounting were not checked: metadata is damaged")
    else:
        problems = _tree_problems(volume, paths)
    if snapshot is not None and not snapshot.replayed:
        notes.append("the log was not replayed: where it continues was in the damaged checkpoint")
    if snapshot is not None and snapshot.log.tail is not None:
        (seg, pos), reason = snapshot.log.tail
        notes.append(f"the log from segment {seg} offset {pos} on was not checked: it was written "
                     f"after the last sync ({reason}); a mount drops it if it is a torn "
                     "write")  # fmt: skip
    verified = moved = 0
    for inode in volume.inodes.values():
        bad: list[tuple[int, int, int, int]] = []
        where = paths.get(inode.ino, f"inode {inode.ino}")
        for ext in inode.extents or ():
            try:
                bad += _bad_blocks(volume, ext)
                verified += ext.length
            except (SegmentGone, FileNotFoundError):
                if snapshot is not None and snapshot.compacted(ext.frame.seg):
                    moved += ext.length  # compacted: the compactor verified it as it moved it
                else:
                    what = f"data in missing segment {ext.frame.seg}"
                    problems.append(Problem(where, what, ProblemKind.MISSING_SEGMENT, inode.ino))
            if progress is not None:
                progress(verified + moved)
        problems += _ranges(where, inode.ino, bad)
    if moved:
        notes.append(f"{moved} bytes were moved by compaction during the check and not read "
                     "(the compactor verifies what it moves)")  # fmt: skip
    return Report(problems, verified, moved, notes)


# -- repair ------------------------------------------------------------------------------------


def orphans(problems: list[Problem]) -> list[Problem]:
    """The problems that `repair` repairs: inodes no directory reaches."""
    return [p for p in problems if p.kind is ProblemKind.UNREACHABLE and p.ino is not None]


def repair(volume: Volume, problems: list[Problem]) -> list[str]:
    """Fix what needs no guessing: link orphans into /lost+found.  Returns what changed.

    Link counts and accounting are recomputed from the tree whenever a volume is loaded, so a
    checkpoint (taken when the repaired volume closes) settles them.  Damaged data is left:
    only the file's owner knows what it should hold, and reads keep reporting EIO.
    """
    changes: list[str] = []
    if not orphans(problems):
        return changes
    root = volume.inodes[ROOT_INO]
    lost_ino = dir_entries(root).get(b"lost+found")
    if lost_ino is None:
        lost = volume.new_inode(stat.S_IFDIR | 0o700, 0, 0, 0, time.time_ns())
        volume.create(root, b"lost+found", lost, time.time_ns())
        lost_ino = lost.ino
        changes.append("created /lost+found")
    lost = volume.inodes[lost_ino]
    for problem in orphans(problems):
        ino = problem.ino
        assert ino is not None  # `orphans` keeps only problems that name their inode
        inode = volume.inodes[ino]
        volume.link(inode, lost, b"#%d" % ino, time.time_ns())
        changes.append(f"inode {ino} linked as /lost+found/#{ino}")
    return changes
