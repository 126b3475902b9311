#!/usr/bin/env bash
# Install volfs and everything it needs on Debian/Ubuntu.
#
#   sudo ./install.sh          system packages + volfs in /opt/volfs, `volfsd` in /usr/local/bin
#   ./install.sh --dev         system packages + volfs editable with test tools in ./.venv
set -euo pipefail
cd "$(dirname "$0")"

mode=system
if [ "${1:-}" = "--dev" ]; then mode=dev; fi

# fuse3: the kernel interface and fusermount3; libfuse3-dev, pkg-config, gcc, python3-dev: to
# build pyfuse3; python3-venv. (The daemon makes its bind mounts with Linux's mount calls on
# descriptors, not with mount(8).)
packages=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv)
# The test suite and bench/ also drive fio, bindfs and rclone (peers to compare with), attr
# tools, and util-linux's setpriv and unshare (tests acting as another user, and from another
# mount namespace; its mount and umount too). (No sqlite3 shell: the SQLite tests use Python's
# own sqlite3 module.) The container tests start their own Docker engine (Debian's docker.io
# brings dockerd, its own containerd and runc, and the /usr/bin/docker client the tests use)
# and build their image from busybox-static; docker-compose is for the compose recipe.
if [ "$mode" = dev ]; then
    packages+=(fio bindfs rclone git attr util-linux mount docker.io busybox-static docker-compose)
fi
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install.sh: missing system packages: ${missing[*]}; run as root (sudo ./install.sh)" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ "$mode" = dev ]; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test]'
    echo "install.sh: development environment ready in .venv"
else
    [ -x /opt/volfs/bin/python ] || python3 -m venv /opt/volfs
    /opt/volfs/bin/pip install -q --upgrade pip
    /opt/volfs/bin/pip install -q .
    ln -sf /opt/volfs/bin/volfsd /usr/local/bin/volfsd
    # mount(8) runs helpers from /sbin, /sbin/fs.d and /sbin/fs only (libmount's fixed path).
    # Not in --dev: the host's mount(8) would run a checkout's code for good; the tests put a
    # helper there for their own run.
    ln -sf /opt/volfs/bin/mount.volfs /sbin/mount.volfs
    echo "install.sh: volfsd installed in /usr/local/bin/volfsd, mount(8)'s helper in /sbin/mount.volfs"
fi
