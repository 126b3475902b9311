"""Directory listings whose offsets stay valid while entries come and go.

A directory's entries are a plain dict, name -> inode number: every entry of every directory
is held in memory, so an entry costs its dict slot and nothing more.  Stable readdir offsets
come from `Listing`, one per open directory handle: it takes a snapshot of the names when the
listing starts (or is rewound) and hands out positions in that snapshot as offsets.  So an
entry that exists for the whole listing is listed exactly once, one removed meanwhile is
skipped, and one added meanwhile may or may not be listed, as POSIX allows.
"""

from __future__ import annotations

from collections.abc import Iterator

#: Offsets 0, 1 and 2 mean the start of the directory, after "." and after "..".
FIRST_OFFSET = 3


class Listing:
    """One pass (or several, after rewinds) over a directory through one open handle."""

    __slots__ = ("_entries", "_names")

    def __init__(self, entries: dict[bytes, int]) -> None:
        self._entries = entries
        self._names: list[bytes] | None = None

    def after(self, offset: int) -> Iterator[tuple[bytes, int, int]]:
        """(name, ino, offset) of each entry after *offset*; offset 0 starts afresh."""
        if offset == 0 or self._names is None:
            self._names = list(self._entries)
        names, entries = self._names, self._entries
        for i in range(max(0, offset - FIRST_OFFSET + 1), len(names)):
            ino = entries.get(names[i])
            if ino is not None:
                yield names[i], ino, FIRST_OFFSET + i
