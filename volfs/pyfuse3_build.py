"""Which pyfuse3 serves the mounts: the release as published, or built with volfs's patch
series (``patches/pyfuse3``, which install.sh applies), and which of the series' features it
therefore has.

volfs runs on either.  The patched build says so in its local version
(``3.5.0+volfs.N.sHASH``: N patches, HASH of the series); each feature is told by the API its
patch adds, so a build with part of the series uses that part.  On the release, fallocate(2)
answers EOPNOTSUPP, SEEK_DATA/SEEK_HOLE see every file as data, and libfuse's default
capabilities stay in force.
"""

from __future__ import annotations

import functools
import importlib.metadata

# pyfuse3 itself is imported where it is needed: it brings trio, and the CLI, which asks
# only for the version, starts a fifth of a second faster without it.

#: What a patched build's local version starts with.
SERIES_MARK = "+volfs."


@functools.cache
def features() -> frozenset[str]:
    """The series' features this pyfuse3 has, each told by the API its patch adds:
    "capabilities" (0001: Operations.enable_capabilities and disable_capabilities,
    get_capabilities), "write_flags" (0002: Operations.write_with_flags), "fallocate" (0003),
    "lseek" (0004: SEEK_DATA and SEEK_HOLE), "locks" (0005: getlk, setlk, flock),
    "absent_xattrs" (0006: set_absent_xattr)."""
    import pyfuse3

    found = {"capabilities"} if hasattr(pyfuse3, "get_capabilities") else set()
    if hasattr(pyfuse3, "set_absent_xattr"):
        found.add("absent_xattrs")
    for feature, attribute in (("write_flags", "write_with_flags"),
                               ("fallocate", "fallocate"), ("lseek", "lseek"),
                               ("locks", "release_locks")):  # fmt: skip
        if hasattr(pyfuse3.Operations, attribute):
            found.add(feature)
    return frozenset(found)


def capability(name: str) -> int:
    """The bit of libfuse capability FUSE_CAP_*name*, or 0 where this pyfuse3 has none."""
    import pyfuse3

    return int(getattr(pyfuse3, f"FUSE_CAP_{name}", 0))


def version() -> str:
    """The installed pyfuse3's version, with its local part (the series) if patched."""
    try:
        return importlib.metadata.version("pyfuse3")
    except importlib.metadata.PackageNotFoundError:  # not installed as a distribution
        import pyfuse3

        return str(pyfuse3.__version__)


def series() -> str | None:
    """The patch series the installed pyfuse3 was built with ("N.sHASH"), or None."""
    found = version()
    return found.split(SERIES_MARK, 1)[1] if SERIES_MARK in found else None


def describe() -> str:
    """One line for `volfsd --version` and the worker's status."""
    patched = series()
    release = version().split("+", 1)[0]
    if patched is None:
        return f"pyfuse3 {release}, unpatched (its patches' features off)"
    return f"pyfuse3 {release}, patched (volfs series {patched})"


def granted() -> dict[str, int] | None:
    """The capabilities of this process's FUSE session, offered and granted, once the kernel
    has initialised it (None before, or without the 0001 patch)."""
    import pyfuse3

    get = getattr(pyfuse3, "get_capabilities", None)
    if get is None:
        return None
    try:
        offered, wanted = get()
    except RuntimeError:
        return None
    return {"offered": int(offered), "granted": int(wanted)}
