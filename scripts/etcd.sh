#!/usr/bin/env bash
# A real etcd for the membership tests (tests/membership.rs start their own on free loopback
# ports): Debian's etcd-server, installed once when `etcd` is not on the PATH. Quick when it is.
#
#   scripts/etcd.sh            # or: source scripts/etcd.sh
#
# No `set -e` here: when sourced it would leak into the caller; failures are checked instead.
if ! command -v etcd >/dev/null 2>&1; then
    echo "installing etcd-server (Debian) for the membership tests" >&2
    _sy_sudo=
    [ "$(id -u)" = 0 ] || _sy_sudo=sudo
    # The package's own service is not wanted: tests run their own etcd.
    $_sy_sudo env DEBIAN_FRONTEND=noninteractive sh -c \
        'apt-get update -qq && apt-get install -y -qq --no-install-recommends etcd-server' >&2 ||
        { echo "etcd.sh: apt-get install etcd-server failed" >&2; return 1 2>/dev/null || exit 1; }
    command -v etcd >/dev/null 2>&1 ||
        { echo "etcd.sh: etcd-server installed but no etcd on the PATH" >&2; return 1 2>/dev/null || exit 1; }
fi
