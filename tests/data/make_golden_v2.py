#!/usr/bin/env python3
"""Build the golden store of format v2 (tests/data/golden-v2/) through real volfs mounts.

    sudo .venv/bin/python tests/data/make_golden_v2.py [OUT]      # default: beside this file

Format 2 is format 1 plus history: snapshots (``snapshots/SNAP/``: a header, a checkpoint,
hard links to the segments it uses) and clones (a volume whose first segments are hard links
to a snapshot's). Run it once, with the volfs of format 2, and commit what it writes;
tests/test_golden.py mounts and loads it with today's code. It writes:

* ``store.tar``: a store root holding volume ``golden`` (8 MiB, 16 KiB segments, so that its
  data spreads over many segments), its snapshots ``first`` and ``second``, and ``golden-clone``,
  a clone of ``golden@first``. A tar, not a directory, because git keeps no hard links and
  the links are what format 2 is about: extract it with ``tar -x`` (or ``cp -a`` a copy);
* ``manifest.json``: for each of ``golden``, ``golden@first``, ``golden@second`` and
  ``golden-clone``, every path with make_golden_v1's description (type, mode, owner, size,
  link count, mtime, device number, symlink target, xattrs, sha256 of the contents).

The history, each step on a mount of its own (``volfsd mount -f``) or on the unmounted volume:

1. golden, mount 1: make_golden_v1's first state, and ``/history`` (``doomed.bin``, written in
   segment-sized pieces so that whole segments hold nothing else, and ``kept.bin``); a clean
   unmount (a checkpoint).
2. ``volfsd snapshot golden@first`` with no daemon: taken in the store (unmounted).
3. golden, mount 2, by a daemon: ``doomed.bin`` deleted, ``kept.bin`` overwritten in part, a
   new file; then ``volfsd snapshot golden@second``, taken by the worker between two requests;
   a clean unmount: golden's checkpoint drops its names of the segments only doomed.bin used.
4. ``volfsd clone golden@first golden-clone``. Mount 1: it deletes its doomed.bin too (so that
   only ``golden@first`` keeps that data), writes into an inherited file, adds its own; a clean
   unmount. Mount 2: a durable log tail of its own, then SIGKILL.
5. golden, mount 3: make_golden_v1's log tail (every log record kind), fsync, SIGKILL.

So a mount of golden replays a checkpoint and a tail, a mount of the clone the same over
segments it shares with the snapshot, and a load of each snapshot replays nothing. The script
then checks the layout by reading the files as docs/ARCHITECTURE.md describes them (headers'
keys, checkpoints' first records, segment headers, hard links by inode and link count), not
with volfs's code, and that each snapshot, loaded read-only by volfs, shows what the mount
showed when it was taken. Contents are deterministic (a fixed seed, times set with utime);
ids, creation times and ctimes differ from run to run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_golden_v1 as v1

from volfs.store import history
from volfs.store.readonly import ReadOnlyState
from volfs.store.root import StoreRoot
from volfs.store.state import ROOT_INO, Inode

HERE = Path(__file__).resolve().parent
NAME, CLONE = v1.NAME, "golden-clone"
FIRST, SECOND = "first", "second"
SIZE = 8 << 20
#: Small segments: several of them, so that a snapshot shares some and keeps some alone.
SEGMENT = 16 << 10
#: The store files of a volume (runtime files, lock, device and reserve, are left out).
KEEP = ("volume", "usage", "durable", "checkpoint")
SNAPSHOT_KEYS = {"kind", "format", "name", "volume", "volume_id", "id", "created_ns", "used",
                 "inodes", "live"}  # fmt: skip
T_SECOND = v1.T0 + 3600 * 10**9
T_CLONE = v1.T0 + 7200 * 10**9
Listing = list[dict[str, object]]


# -- the history -------------------------------------------------------------------------------


def before_first(m: Path, rng: random.Random) -> None:
    """Golden's state at ``first``: v1's checkpointed state, and files the history changes."""
    v1.before_checkpoint(m, rng)
    (m / "history").mkdir()
    with open(m / "history" / "doomed.bin", "wb", buffering=0) as f:
        for _ in range(3):  # one frame per write, each filling a segment of its own
            f.write(v1.data(rng, SEGMENT))
    (m / "history" / "kept.bin").write_bytes(v1.data(rng, 30_000))
    os.setxattr(m / "history" / "kept.bin", "user.state", b"first")
    v1.set_times(m, v1.T0)


def after_first(m: Path, rng: random.Random) -> None:
    """Golden between ``first`` and ``second``."""
    os.unlink(m / "history" / "doomed.bin")  # its data: only golden@first keeps it
    with open(m / "history" / "kept.bin", "r+b") as f:
        f.seek(10_000)
        f.write(v1.data(rng, 5000))
    os.setxattr(m / "history" / "kept.bin", "user.state", b"second")
    (m / "history" / "after-first").write_bytes(b"written after golden@first\n")
    os.chmod(m / "history", 0o750)
    v1.set_times(m, T_SECOND)


def clone_first_mount(m: Path, rng: random.Random) -> None:
    """The clone's own changes, on top of what it inherited from golden@first."""
    os.unlink(m / "history" / "doomed.bin")
    with open(m / "docs" / "blocks.bin", "r+b") as f:  # data in an inherited segment
        f.seek(10_000)
        f.write(v1.data(rng, 8000))
    (m / "clone-own.bin").write_bytes(v1.data(rng, 20_000))
    os.link(m / "clone-own.bin", m / "history" / "clone-link")
    os.setxattr(m / "history" / "kept.bin", "user.state", b"clone")
    v1.set_times(m, T_CLONE)


def clone_tail(m: Path, rng: random.Random) -> None:
    """A durable log tail of the clone's own."""
    with open(m / "clone-own.bin", "r+b") as f:
        f.seek(15_000)
        f.write(v1.data(rng, 10_000))
        os.fsync(f.fileno())


def mounted(
    root: Path, mnt: Path, name: str, work: Callable[[Path, random.Random], None],
    rng: random.Random, clean: bool,
) -> Listing:  # fmt: skip
    """Mount *name*, do *work*, describe it; then a clean unmount, or SIGKILL (a log tail)."""
    mount = v1.Mount(root, mnt, name)
    try:
        work(mnt, rng)
        listing = v1.manifest(mnt)
    except BaseException:
        mount.kill()
        raise
    if clean:
        mount.stop()
    else:
        mount.kill()
    return listing


def volfsd(root: Path, *args: str) -> None:
    """The CLI on the store at *root*, with the run dir `v1.Mount` uses."""
    env = {**os.environ, "VOLFS_ROOT": str(root), "VOLFS_RUN_DIR": str(root.parent / "run")}
    done = subprocess.run([sys.executable, "-m", "volfs", *args], env=env, capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"make_golden_v2: volfsd {' '.join(args)}: {done.stderr.strip()}")


def snapshot_by_worker(root: Path, mnt: Path, rng: random.Random) -> Listing:
    """Golden mounted by a daemon, changed, snapshotted as SECOND by its worker, unmounted."""
    volfsd(root, "mount", NAME, str(mnt))
    pid_file = root.parent / "run" / "volfsd.pid"
    try:
        after_first(mnt, rng)
        listing = v1.manifest(mnt)
        volfsd(root, "snapshot", f"{NAME}@{SECOND}")
    finally:
        volfsd(root, "umount", "--all")  # a clean unmount: the worker checkpoints
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, signal.SIGTERM)
        while not _ended(pid):
            time.sleep(0.05)
    return listing


def _ended(pid: int) -> bool:
    """Whether process *pid* (not our child) has ended; a zombie has."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(") ", 1)[1].startswith("Z")
    except OSError:
        return True


def build(root: Path, mnt: Path) -> dict[str, Listing]:
    """The store's whole history (module docstring); what each volume and snapshot shows."""
    rng = random.Random(20261202)
    StoreRoot(root).create_volume(NAME, size=SIZE, segment_size=SEGMENT)
    want = {f"{NAME}@{FIRST}": mounted(root, mnt, NAME, before_first, rng, clean=True)}
    volfsd(root, "snapshot", f"{NAME}@{FIRST}")  # no daemon runs: taken in the store
    want[f"{NAME}@{SECOND}"] = snapshot_by_worker(root, mnt, rng)
    volfsd(root, "clone", f"{NAME}@{FIRST}", CLONE)
    mounted(root, mnt, CLONE, clone_first_mount, rng, clean=True)
    want[CLONE] = mounted(root, mnt, CLONE, clone_tail, rng, clean=False)
    want[NAME] = mounted(root, mnt, NAME, v1.after_checkpoint, rng, clean=False)
    return dict(sorted(want.items()))


# -- what a read-only load shows, described as a mount's paths are -----------------------------


def state_manifest(state: ReadOnlyState) -> Listing:
    """make_golden_v1's manifest of a loaded state (a snapshot has no mount to walk yet)."""
    listing: Listing = []
    pending = [("/", state.inodes[ROOT_INO])]
    while pending:
        path, inode = pending.pop()
        listing.append(_describe_inode(state, path, inode))
        if inode.entries is not None:
            for name, ino in sorted(inode.entries.items(), key=lambda e: os.fsdecode(e[0]),
                                    reverse=True):  # fmt: skip
                pending.append((path.rstrip("/") + "/" + os.fsdecode(name), state.inodes[ino]))
    return listing


def _describe_inode(state: ReadOnlyState, path: str, inode: Inode) -> dict[str, object]:
    kind = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
            stat.S_IFIFO: "fifo", stat.S_IFCHR: "chardev", stat.S_IFBLK: "blockdev",
            stat.S_IFSOCK: "socket"}[stat.S_IFMT(inode.mode)]  # fmt: skip
    entry: dict[str, object] = {
        "path": path,
        "type": kind,
        "mode": stat.S_IMODE(inode.mode),
        "uid": inode.uid,
        "gid": inode.gid,
        "size": inode.size,
        "nlink": inode.nlink,
        "mtime_ns": inode.mtime_ns,
    }
    if kind == "file":
        entry["sha256"] = hashlib.sha256(state.read(inode, 0, inode.size)).hexdigest()
    elif kind == "symlink":
        entry["target"] = os.fsdecode(inode.target or b"")
    elif kind in ("chardev", "blockdev"):
        entry["rdev"] = [os.major(inode.rdev), os.minor(inode.rdev)]
    if kind != "symlink":
        xattrs = {os.fsdecode(n): v.hex() for n, v in (inode.xattrs or {}).items()}
        entry["xattrs"] = dict(sorted(xattrs.items()))
    return entry


def snapshot_manifest(root: Path, name: str, snap: str) -> Listing:
    """What snapshot *name*@*snap* of the store at *root* holds, loaded read-only by volfs."""
    state, held = history.load(StoreRoot(root), name, snap)
    try:
        return state_manifest(state)
    finally:
        state.close()
        os.close(held)


# -- reading the layout, by the spec -----------------------------------------------------------


def header_of(path: Path) -> dict[str, object]:
    """A one-frame file (a volume's or a snapshot's header), by ARCHITECTURE's frame layout:
    u32 meta_len, u32 data_len, u64 checksum, then the msgpack meta part (a map)."""
    raw = path.read_bytes()
    (meta_len,) = struct.unpack_from("<I", raw, 0)
    header = msgpack.unpackb(raw[16 : 16 + meta_len], raw=False, strict_map_key=False)
    assert isinstance(header, dict), path
    return header


def segment_files(directory: Path) -> dict[int, os.stat_result]:
    return {int(p.name[4:-4]): p.lstat() for p in sorted(directory.glob("seg-*.log"))}


def segment_owner(path: Path) -> str:
    """The volume id in a segment's first frame, ``["volfs-segment", id, number]``."""
    (_, meta), *_ = v1.frames(path)
    assert meta[0] == b"volfs-segment", path
    return meta[1].decode()


def checkpoint_facts(directory: Path) -> tuple[tuple[int, int], set[int]]:
    """The log position a checkpoint covers, and the segments its EXTENTS records name."""
    records = [r for _, meta in v1.frames(directory / "checkpoint") for r in meta]
    assert records[0][0] == 10, f"{directory}: a checkpoint starts with a CHECKPOINT record"
    named = {piece[3] for r in records if r[0] == 9 for piece in r[2]}  # [9, ino, [[.., seg, ..]]]
    return (records[0][2], records[0][3]), named


def check_layout(root: Path) -> list[str]:
    """What is wrong with the layout of the built store (empty: nothing); notes go to stdout."""
    problems: list[str] = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    volumes = root / "volumes"
    golden, clone = header_of(volumes / NAME / "volume"), header_of(volumes / CLONE / "volume")
    need(golden.get("format") == 2 and clone.get("format") == 2, "volume headers say format 2")
    live = segment_files(volumes / NAME)
    taken: dict[str, dict[str, object]] = {}
    for snap in (FIRST, SECOND):
        where = volumes / NAME / "snapshots" / snap
        header = taken[snap] = header_of(where / "snapshot")
        need(set(header) == SNAPSHOT_KEYS, f"{snap}: header keys {sorted(header)}")
        used = header.get("live") or {}  # segment -> bytes its files used: each one it links
        need(set(used) == set(segment_files(where)), f"{snap}: live {used}")
        need(header.get("kind") == "volfs-snapshot" and header.get("format") == 2
             and header.get("name") == snap and header.get("volume") == NAME
             and header.get("volume_id") == golden["id"], f"{snap}: header {header}")  # fmt: skip
        linked = segment_files(where)
        (seg, offset), named = checkpoint_facts(where)
        need(offset == 0 and seg > max(linked), f"{snap}: checkpoint covers ({seg}, {offset})")
        need(named <= set(linked), f"{snap}: data in unlinked segments {named - set(linked)}")
        for number, st in linked.items():
            if number in live:
                need(live[number].st_ino == st.st_ino, f"{snap}: seg {number} is not golden's")
            need(segment_owner(where / f"seg-{number:08d}.log") == golden["id"],
                 f"{snap}: seg {number} names another volume")  # fmt: skip
    first_dir = volumes / NAME / "snapshots" / FIRST
    first = segment_files(first_dir)
    alone = [n for n, st in first.items() if st.st_nlink == 1]
    need(bool(alone), "golden@first keeps no segment alone (doomed.bin's data)")
    need(any(n in live for n in first), "golden@first shares no segment with golden")
    origin = clone.get("origin") or {}
    need(origin == {"volume": NAME, "snapshot": FIRST, "volume_id": golden["id"],
                    "snapshot_id": taken[FIRST]["id"]}, f"clone origin {origin}")  # fmt: skip
    own = segment_files(volumes / CLONE)
    inherited = [n for n, st in own.items() if n in first and first[n].st_ino == st.st_ino]
    mine = [n for n in own if n not in first]
    (start, _), _ = checkpoint_facts(first_dir)
    need(bool(inherited) and bool(mine), f"clone: inherited {inherited}, own {mine}")
    need(all(n >= start for n in mine), f"clone: own segments {mine} before {start}")
    for n in inherited:
        need(segment_owner(volumes / CLONE / f"seg-{n:08d}.log") == golden["id"], f"clone {n}")
    for n in mine:
        need(segment_owner(volumes / CLONE / f"seg-{n:08d}.log") == clone["id"], f"clone {n}")
    print(f"make_golden_v2: golden@first keeps segments {alone} alone; the clone inherited "
          f"{inherited} and wrote {mine}")  # fmt: skip
    return problems


def record_kinds_or_fail(root: Path) -> None:
    want_tail = {"INODE", "LINK", "UNLINK", "RENAME", "EXCHANGE", "WRITE", "XATTR"}
    checkpoint, tail = v1.record_kinds(root / "volumes" / NAME)
    if {"CHECKPOINT", "EXTENTS"} - checkpoint or want_tail - tail:
        raise SystemExit(f"make_golden_v2: missing record kinds: checkpoint has "
                         f"{sorted(checkpoint)}, the log tail {sorted(tail)}")  # fmt: skip
    clone_checkpoint, clone_tail_kinds = v1.record_kinds(root / "volumes" / CLONE)
    if "EXTENTS" not in clone_checkpoint or "WRITE" not in clone_tail_kinds:
        raise SystemExit("make_golden_v2: the clone has no checkpoint of its own or no tail")


# -- the archive -------------------------------------------------------------------------------


def store_paths(root: Path) -> list[Path]:
    """The files a copy of the store needs, directories first: FORMAT, each volume's KEEP
    files and segments, each snapshot's files."""
    paths = [root / "FORMAT", root / "volumes"]
    for volume in sorted((root / "volumes").iterdir()):
        paths.append(volume)
        paths += [volume / n for n in KEEP] + sorted(volume.glob("seg-*.log"))
        snaps = volume / "snapshots"
        if snaps.is_dir():
            paths.append(snaps)
            for snap in sorted(snaps.iterdir()):
                paths += [snap, *sorted(snap.iterdir())]
    return paths


def write_archive(root: Path, out: Path) -> None:
    """*root*'s store files as a tar that keeps their hard links, owner root, modes as made."""

    def plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in store_paths(root):
            tar.add(path, arcname=str(path.relative_to(root)), recursive=False, filter=plain)


def links_of(root: Path) -> dict[str, tuple[int, int]]:
    """For each store file: its link count, and the index (in `store_paths` order) of the
    first path that is the same file, so that two stores compare equal only when their names
    are linked alike."""
    first: dict[int, int] = {}
    found = {}
    for i, path in enumerate(p for p in store_paths(root) if p.is_file()):
        st = path.lstat()
        found[str(path.relative_to(root))] = (st.st_nlink, first.setdefault(st.st_ino, i))
    return found


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "golden-v2"
    if os.geteuid() != 0:
        print("make_golden_v2: run as root (device nodes, chown, allow_other)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="volfs-golden-") as tmp:
        root, mnt = Path(tmp) / "store", Path(tmp) / "mnt"
        want = build(root, mnt)
        record_kinds_or_fail(root)
        problems = check_layout(root)
        for snap in (FIRST, SECOND):
            if snapshot_manifest(root, NAME, snap) != want[f"{NAME}@{snap}"]:
                problems.append(f"{NAME}@{snap} loaded does not show what the mount showed")
        if problems:
            print("make_golden_v2: " + "; ".join(problems), file=sys.stderr)
            return 1
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        write_archive(root, out / "store.tar")
        copy = Path(tmp) / "copy"
        copy.mkdir()
        subprocess.run(["tar", "-xf", str(out / "store.tar"), "-C", str(copy)], check=True)
        if links_of(copy) != links_of(root):
            print("make_golden_v2: the archive does not keep the store's links", file=sys.stderr)
            return 1
        (out / "manifest.json").write_text(json.dumps(want, indent=1) + "\n")
    print(f"make_golden_v2: wrote {out}: {', '.join(want)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
