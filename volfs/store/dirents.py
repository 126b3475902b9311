"""Directory entries with readdir offsets that stay valid while entries come and go.

Every entry gets a *cookie* from a per-directory counter when it is added.  Cookies only grow,
so listing "everything after cookie N" never repeats or skips an entry that existed for the
whole listing, whatever was added or removed meanwhile.  Cookies live only in memory: the
kernel does not keep readdir offsets across mounts.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator

#: Offsets 0, 1 and 2 mean the start of the directory, after "." and after "..".
FIRST_COOKIE = 3


class DirEntries:
    __slots__ = ("_by_cookie", "_cookies", "_entries", "_next_cookie")

    def __init__(self) -> None:
        self._entries: dict[bytes, tuple[int, int]] = {}  # name -> (ino, cookie)
        self._by_cookie: dict[int, bytes] = {}
        self._cookies: list[int] = []  # ascending; may hold cookies of removed entries
        self._next_cookie = FIRST_COOKIE

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: bytes) -> bool:
        return name in self._entries

    def get(self, name: bytes) -> int | None:
        entry = self._entries.get(name)
        return None if entry is None else entry[0]

    def add(self, name: bytes, ino: int) -> None:
        cookie = self._next_cookie
        self._next_cookie += 1
        self._entries[name] = (ino, cookie)
        self._by_cookie[cookie] = name
        self._cookies.append(cookie)

    def replace(self, name: bytes, ino: int) -> int:
        """Point the existing entry *name* at *ino*, keeping its place in listings; return
        the inode it pointed to."""
        old, cookie = self._entries[name]
        self._entries[name] = (ino, cookie)
        return old

    def remove(self, name: bytes) -> int:
        """Remove *name* and return the inode it pointed to."""
        ino, cookie = self._entries.pop(name)
        del self._by_cookie[cookie]
        if len(self._cookies) > 64 and len(self._cookies) > 2 * len(self._by_cookie):
            self._cookies = [c for c in self._cookies if c in self._by_cookie]
        return ino

    def names(self) -> Iterator[tuple[bytes, int]]:
        """(name, ino) in the order the entries were added."""
        for name, (ino, _cookie) in self._entries.items():
            yield name, ino

    def after(self, cookie: int) -> Iterator[tuple[bytes, int, int]]:
        """(name, ino, cookie) of each entry added after *cookie*, in cookie order."""
        cookies = self._cookies
        i = bisect_right(cookies, cookie)
        while i < len(cookies):
            c = cookies[i]
            i += 1
            name = self._by_cookie.get(c)
            if name is not None:
                yield name, self._entries[name][0], c
