"""``mount.volfs``: the helper mount(8) runs for ``mount -t volfs NAME DIR`` and fstab lines.

mount(8) runs ``/sbin/mount.volfs NAME DIR [-sfnv] [-N NAMESPACE] [-o OPTIONS] [-t TYPE]``
(util-linux 2.38, measured): DIR made absolute; ``defaults`` expanded to ``rw``, ``rw``
given when neither ``rw`` nor ``ro`` is; ``auto``, ``noauto``, ``nouser``, ``comment=``
and ``x-*`` taken out, ``_netdev`` and ``nofail`` left in; ``user`` and ``users`` arrive as
``noexec,nosuid,nodev,user``.  The mount is the daemon's, as for `volfsd mount` (the same
code path: it starts the daemon if none runs, and returns once the mount is live), and
umount(8) needs no helper: see mount_watch.py.

Exit statuses are those mount(8) documents: 1 for a wrong invocation or permissions
(an unknown option, a bad name or size), 32 for a mount that failed, 4 for a bug.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from volfs import cli, requests
from volfs.catalog import parse_inodes, parse_size
from volfs.errors import ErrorCode, VolfsError
from volfs.mountpoint import normalize
from volfs.store.headers import check_name

PROG = "mount.volfs"

#: mount(8)'s exit statuses (its EXIT STATUS section).
USAGE = 1
INTERNAL = 4
INTERRUPTED = 8
FAILED = 32

#: Options that are mount(8)'s or systemd's (read by them from fstab, or harmless here).
IGNORED = ("defaults", "_netdev", "nofail", "auto", "noauto", "nouser")
#: Prefixes of options that are mount(8)'s or systemd's (``x-systemd.requires=...``).
IGNORED_PREFIXES = ("x-", "X-", "comment=")
ACCEPTED = (
    "defaults, _netdev, nofail, auto, noauto, nouser, rw, ro, size=SIZE, inodes=N, x-*, comment=*"
)
#: Options mount(8) adds for ``user``, ``users``, ``owner`` and ``group``.
UNPRIVILEGED = ("user", "users", "noexec", "nosuid", "nodev")


class HelperError(VolfsError):
    """A refusal of the helper itself: mount(8)'s exit status 1 (a wrong invocation)."""


@dataclass
class Invocation:
    """What mount(8) asked for."""

    name: str
    mountpoint: Path
    read_only: bool = False
    size: int = 0
    inodes: int = 0
    fake: bool = False  #: -f: do everything but mount
    verbose: bool = False


def parse_args(argv: Sequence[str]) -> Invocation:
    """mount(8)'s arguments to the helper: NAME DIR, then flags in any order."""
    words = list(argv)
    positional: list[str] = []
    options: list[str] = []
    letters = ""
    while words:
        word = words.pop(0)
        if word in ("-o", "-t", "-N") and not words:
            raise HelperError(f"{word} needs a value")
        if word == "-o":
            options.extend(o for o in words.pop(0).split(",") if o)
        elif word == "-t":
            words.pop(0)  # volfs or fuse.volfs: this helper serves one type
        elif word == "-N":
            raise HelperError("-N is not supported: volfsd mounts in its own mount namespace")
        elif word.startswith("-") and len(word) > 1:
            letters += word[1:]
        else:
            positional.append(word)
    unknown = set(letters) - set("sfnv")  # -n: no mtab to write; volfs writes none anyway
    if unknown:
        raise HelperError(f"unknown flag -{min(unknown)} (mount(8) passes -s, -f, -n, -v, -o)")
    if len(positional) != 2:
        raise HelperError("usage: mount.volfs NAME DIR [-sfnv] [-o OPTIONS] (run by mount(8))")
    found = Invocation(check_name(positional[0]), normalize(positional[1]),
                       fake="f" in letters, verbose="v" in letters)  # fmt: skip
    apply_options(found, options, sloppy="s" in letters)
    return found


def apply_options(invocation: Invocation, options: Sequence[str], sloppy: bool = False) -> None:
    """Set what the comma-separated *options* ask for on *invocation*; with *sloppy* (``-s``)
    an unknown option is left out instead of refused."""
    if any(o in ("user", "users") for o in options):
        raise HelperError(
            "the user option is not supported: the volfsd daemon, which makes the mounts, "
            "runs as root; mount as root instead (and drop user from the fstab line)"
        )
    for option in options:
        key, _, value = option.partition("=")
        if option in IGNORED or option.startswith(IGNORED_PREFIXES):
            continue
        if option in ("rw", "ro"):
            invocation.read_only = option == "ro"
        elif key == "size" and value:
            invocation.size = parse_size(value)
        elif key == "inodes" and value:
            invocation.inodes = parse_inodes(value)
        elif option in UNPRIVILEGED:
            raise HelperError(
                f"option {option} is not supported (mount(8) adds it for owner and group, "
                "which volfs does not support either); accepted: " + ACCEPTED
            )
        elif not sloppy:
            raise HelperError(f"unknown option {option[:80]}; accepted: {ACCEPTED}")


def mount(invocation: Invocation) -> None:
    """Mount through the daemon, as `volfsd mount` does."""
    if invocation.fake:
        return
    request = requests.MountRequest(
        invocation.name, invocation.mountpoint, invocation.read_only, invocation.size,
        invocation.inodes,
    )  # fmt: skip
    cli.mount_through_daemon(request)
    if invocation.verbose:
        ro = " (read-only)" if invocation.read_only else ""
        print(f"{PROG}: volume {invocation.name} mounted at {invocation.mountpoint}{ro}")


def exit_status(error: VolfsError) -> int:
    """mount(8)'s exit status for *error*."""
    if isinstance(error, HelperError) or error.code in (ErrorCode.INVALID, ErrorCode.PERMISSION):
        return USAGE
    return INTERNAL if error.code == ErrorCode.INTERNAL else FAILED


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        mount(parse_args(argv))
    except VolfsError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exit_status(exc)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{PROG}: {exc.strerror or exc}{where}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:
        return INTERRUPTED
    except Exception as exc:  # a bug: one line that says where the whole story is
        logged = cli._log_internal_error(["mount.volfs", *argv])
        where = f"the traceback is in {logged}" if logged else "no store to log the traceback in"
        print(f"{PROG}: internal error ({type(exc).__name__}); {where}", file=sys.stderr)
        return INTERNAL
    return 0


if __name__ == "__main__":
    sys.exit(main())
