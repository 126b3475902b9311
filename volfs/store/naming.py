"""Names of a volume's files for people: paths for log lines and check reports.

The store keeps no path per inode (directories know their parent, files do not), so a path
is found from the directories when one is needed: for a line that reports damage, not on
the hot path.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from volfs.store.state import VolumeState

logger = logging.getLogger(__name__)

ROOT_INO = 1
#: Directories deeper than this are a loop (damage): no path is reported.
MAX_DEPTH = 4096


def join_path(prefix: str, name: bytes) -> str:
    """The path of entry *name* of the directory at *prefix* (a path from the volume's root),
    printable whatever bytes the name holds."""
    return f"{'' if prefix == '/' else prefix}/{name.decode(errors='backslashreplace')}"


def path_of(state: VolumeState, ino: int) -> str | None:
    """A path of inode *ino* from the volume's root, or None if no directory holds it.

    A file's directory is found by searching every directory's entries, about 30 ms per
    million entries; a file with several links gets one of its names."""
    names: list[bytes] = []
    while ino != ROOT_INO:
        inode = state.inodes.get(ino)
        if inode is None or len(names) > MAX_DEPTH:
            return None
        if inode.entries is not None:
            parent = state.inodes.get(inode.parent)
        else:
            held = (d for d in state.inodes.values() if d.entries and ino in d.entries.values())
            parent = next(held, None)
        if parent is None or parent.entries is None:
            return None
        name = next((n for n, child in parent.entries.items() if child == ino), None)
        if name is None:
            return None
        names.append(name)
        ino = parent.ino
    path = "/"
    for name in reversed(names):
        path = join_path(path, name)
    return path


def log_damage(state: VolumeState, ino: int, start: int, end: int, what: str) -> None:
    """One line naming the volume, the file (its path when it has one) and the damaged bytes
    [start, end) of it; the journal gets the volume and the inode as fields."""
    path = path_of(state, ino) or "a file without a name"
    logger.error("volume %s: damaged data in %s, bytes %d-%d (inode %d; %s)",
                 state.name, path, start, end, ino, what,
                 extra={"volume": state.name, "inode": ino})  # fmt: skip
