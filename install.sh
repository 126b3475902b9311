#!/usr/bin/env bash
# Install volfs and everything it needs on Debian/Ubuntu.
#
#   sudo ./install.sh          system packages + volfs in /opt/volfs, `volfsd` in /usr/local/bin
#   ./install.sh --dev         system packages + volfs editable with test tools in ./.venv
set -euo pipefail
cd "$(dirname "$0")"

mode=system
if [ "${1:-}" = "--dev" ]; then mode=dev; fi

# fuse3: the kernel interface and fusermount3; libfuse3-dev, pkg-config, gcc, python3-dev,
# patch: to build pyfuse3 with volfs's patches (below); python3-venv. (The daemon makes its bind mounts with Linux's mount calls on
# descriptors, not with mount(8).)
packages=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv patch)
# The test suite and bench/ also drive fio, bindfs and rclone (peers to compare with), attr
# tools, and util-linux's setpriv and unshare (tests acting as another user, and from another
# mount namespace; its mount and umount too). (No sqlite3 shell: the SQLite tests use Python's
# own sqlite3 module.) The container tests start their own Docker engine (Debian's docker.io
# brings dockerd, its own containerd and runc, and the /usr/bin/docker client the tests use)
# and build their image from busybox-static; docker-compose is for the compose recipe.
# The PostgreSQL engine's tests start their own server from Debian's postgresql (15); volfs
# itself needs only its driver, psycopg, which pip installs with its own libpq.
if [ "$mode" = dev ]; then
    packages+=(fio bindfs rclone git attr util-linux mount docker.io busybox-static docker-compose postgresql)
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

# pyfuse3, built from its published source distribution with patches/pyfuse3/series applied
# (patches/pyfuse3/README.md says why), installed before volfs so that volfs's `pyfuse3==`
# pin is met by it. The wheel is kept in build/pyfuse3/, named by the series' hash, so a rerun
# installs it again without building; a changed series builds anew.
PYFUSE3_VERSION=3.5.0
CYTHON_VERSION=3.2.4
install_patched_pyfuse3() {  # install_patched_pyfuse3 PYTHON: into the venv of PYTHON
    local python="$1" series=patches/pyfuse3 cache=build/pyfuse3 hash count version wheel src
    hash=$(cd "$series" && cat series $(cat series) | sha256sum | cut -c1-8)
    count=$(grep -c . "$series/series")
    # The local version says which series it carries: `volfsd --version` shows it.
    version="$PYFUSE3_VERSION+volfs.$count.s$hash"
    if [ "$("$python" -c 'import importlib.metadata as m; print(m.version("pyfuse3"))' \
        2>/dev/null)" = "$version" ]; then
        return
    fi
    wheel=$(ls "$cache/$hash"/pyfuse3-*.whl 2>/dev/null | head -n 1 || true)
    if [ -z "$wheel" ]; then
        echo "install.sh: building pyfuse3 $version (patches/pyfuse3, about a minute)"
        mkdir -p "$cache"
        [ -x "$cache/venv/bin/python" ] || python3 -m venv "$cache/venv"
        "$cache/venv/bin/pip" install -q "cython==$CYTHON_VERSION" "setuptools>=78.1.1" \
            "setuptools_scm>=8" wheel
        src=$(mktemp -d "$cache/src.XXXXXX")
        "$cache/venv/bin/pip" download -q --no-deps --no-binary :all: -d "$src" \
            "pyfuse3==$PYFUSE3_VERSION"
        tar -xzf "$src/pyfuse3-$PYFUSE3_VERSION.tar.gz" -C "$src" --no-same-owner
        local patch
        for patch in $(cat "$series/series"); do
            if ! patch -d "$src/pyfuse3-$PYFUSE3_VERSION" -p1 --batch --forward --fuzz=0 \
                --quiet < "$series/$patch" >/dev/null; then
                echo "install.sh: $series/$patch does not apply to pyfuse3 $PYFUSE3_VERSION;" \
                    "refresh the series ($series/README.md)" >&2
                rm -rf "$src"
                exit 1
            fi
        done
        # The sdist's C file was generated from the unpatched .pyx: Cython makes it anew.
        rm -f "$src/pyfuse3-$PYFUSE3_VERSION/src/pyfuse3/__init__.c"
        (cd "$src/pyfuse3-$PYFUSE3_VERSION" && SETUPTOOLS_SCM_PRETEND_VERSION="$version" \
            "$OLDPWD/$cache/venv/bin/pip" wheel -q --no-build-isolation --no-deps -w "$OLDPWD/$src" . \
            >"$OLDPWD/$src/build.log" 2>&1) || {
            echo "install.sh: building pyfuse3 failed; its output is in $src/build.log" >&2
            exit 1
        }
        mkdir -p "$cache/$hash"
        mv "$src"/pyfuse3-*.whl "$cache/$hash/"
        rm -rf "$src"
        wheel=$(ls "$cache/$hash"/pyfuse3-*.whl | head -n 1)
    fi
    "$python" -m pip install -q --no-deps --force-reinstall "$wheel"
}

if [ "$mode" = dev ]; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    install_patched_pyfuse3 .venv/bin/python
    .venv/bin/pip install -q -e '.[test]'
    echo "install.sh: development environment ready in .venv"
else
    [ -x /opt/volfs/bin/python ] || python3 -m venv /opt/volfs
    /opt/volfs/bin/pip install -q --upgrade pip
    install_patched_pyfuse3 /opt/volfs/bin/python
    /opt/volfs/bin/pip install -q .
    ln -sf /opt/volfs/bin/volfsd /usr/local/bin/volfsd
    # mount(8) runs helpers from /sbin, /sbin/fs.d and /sbin/fs only (libmount's fixed path).
    # Not in --dev: the host's mount(8) would run a checkout's code for good; the tests put a
    # helper there for their own run.
    ln -sf /opt/volfs/bin/mount.volfs /sbin/mount.volfs
    echo "install.sh: volfsd installed in /usr/local/bin/volfsd, mount(8)'s helper in /sbin/mount.volfs"
fi
