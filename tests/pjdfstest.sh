#!/usr/bin/env bash
# pjdfstest, the POSIX conformance suite, on a fresh volfs volume; as root.
#
#   tests/pjdfstest.sh [PJDFSTEST_TARBALL]
#
# Builds pjdfstest from the tarball (default ../shared/suites/pjdfstest-85a8aea.tar.gz) in a
# temporary directory, mounts a new volume with `volfsd mount` in a temporary store root and
# runtime dir of its own, runs `prove -r` in a directory of the mount, unmounts, and checks the
# store with `volfsd fsck`. Exits 0 only if prove says `Result: PASS`, the store is clean and
# volfs logged no error or traceback.
# With VOLFS_PJDFSTEST_ENGINE_URL=postgresql://... the volume is one of that PostgreSQL
# engine instead (a daemon with it in its config; the check at the end is the engine's).
# Whatever it started (the daemon, the worker, the mount) is ended by pid on any exit.
# Needs autoconf automake gcc make perl libssl-dev (.ci/run installs them).
set -euo pipefail
top="$(cd "$(dirname "$0")/.." && pwd)"
tarball="${1:-$top/../shared/suites/pjdfstest-85a8aea.tar.gz}"
python="${PYTHON:-$top/.venv/bin/python}"
[ "$(id -u)" -eq 0 ] || { echo "pjdfstest.sh: run as root" >&2; exit 2; }
[ -f "$tarball" ] || { echo "pjdfstest.sh: no pjdfstest tarball at $tarball" >&2; exit 2; }

tmp="$(mktemp -d /tmp/volfs-pjdfstest.XXXXXX)"
# A daemon of our own, serving no Docker plugin (the host's driver name is not ours to take).
export VOLFS_ROOT="$tmp/store" VOLFS_RUN_DIR="$tmp/run" VOLFS_DOCKER_PLUGIN=off
mnt="$tmp/mnt"
volfsd() { "$python" -m volfs "$@"; }

pid_in() {  # the pid a pid file or lock file holds (first word), or nothing
    [ -f "$1" ] && read -r pid _ <"$1" && [ -n "$pid" ] && echo "$pid" || true
}

cleanup() {
    local rc=$? daemon worker
    cd /
    daemon="$(pid_in "$VOLFS_RUN_DIR/volfsd.pid")"
    worker="$(pid_in "$VOLFS_ROOT/volumes/pjd/lock")"
    timeout 120 "$python" -m volfs umount --all >/dev/null 2>&1 || true
    for pid in $daemon $worker; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in $daemon $worker; do
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    if grep -q " $mnt " /proc/self/mountinfo; then fusermount3 -uz "$mnt" || true; fi
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "pjdfstest.sh: building pjdfstest in $tmp/pjdfstest"
tar -xzf "$tarball" -C "$tmp"
(cd "$tmp/pjdfstest" && autoreconf -ifs && ./configure && make pjdfstest) >"$tmp/build.log" 2>&1 \
    || { tail -30 "$tmp/build.log" >&2; echo "pjdfstest.sh: build failed" >&2; exit 2; }

engine_url="${VOLFS_PJDFSTEST_ENGINE_URL:-}"
if [ -n "$engine_url" ]; then
    (umask 077 && printf '[engines.cluster]\nurl = "%s"\n' "$engine_url" >"$tmp/volumes.toml")
    mkdir -p "$VOLFS_ROOT"
    volfsd serve --config "$tmp/volumes.toml" >"$tmp/daemon.log" 2>&1 &
    for _ in $(seq 300); do volfsd status >/dev/null 2>&1 && break; sleep 0.1; done
    volfsd create pjd --engine cluster
fi
volfsd mount pjd "$mnt"
mkdir "$mnt/pjd"
started=$SECONDS
set +e
(cd "$mnt/pjd" && prove -r "$tmp/pjdfstest/tests") 2>&1 | tee "$tmp/prove.log"
set -e
echo "pjdfstest.sh: prove took $((SECONDS - started)) s"
volfsd umount "$mnt"
if [ -n "$engine_url" ]; then
    "$python" - "$engine_url" <<'CHECK'
import sys
from volfs.pg import check, schema
with schema.connect(sys.argv[1]) as conn:
    found = check.problems(conn, schema.volume_id(conn, "pjd"))
print(f"volume pjd (PostgreSQL engine): {len(found)} problem(s)", *found, sep="\n")
sys.exit(1 if found else 0)
CHECK
else
    volfsd fsck pjd
fi
grep -q '^Result: PASS' "$tmp/prove.log" || { echo "pjdfstest.sh: pjdfstest failed" >&2; exit 1; }
if grep -E ' (ERROR|CRITICAL) |^Traceback' "$VOLFS_ROOT"/logs/*.log "$tmp"/daemon.log* >&2; then
    echo "pjdfstest.sh: volfs logged errors (above)" >&2
    exit 1
fi
grep '^Files=' "$tmp/prove.log"
