# Sourced by scripts/test.sh first: the Debian packages the tests need, installed in one apt
# pass when missing (as root, or with sudo). Quick when everything is there.
#   etcd-server        the membership tests start their own etcd
#   prometheus         Prometheus and promtool for the metrics tests
#   chromium           headless Chromium for the dashboard test
#   python3-venv/-pip  the openai-package venv and the NVRTC/ptxas wheels
#   procps             /bin/kill, which the fault tests send SIGSTOP/SIGTERM with
# No `set -e` here: when sourced it would leak into the caller; failures are checked instead.
_sy_need=()
command -v etcd >/dev/null || _sy_need+=(etcd-server)
{ command -v prometheus && command -v promtool; } >/dev/null || _sy_need+=(prometheus)
command -v chromium >/dev/null || _sy_need+=(chromium)
command -v python3 >/dev/null || _sy_need+=(python3)
python3 -c 'import ensurepip, venv' 2>/dev/null || _sy_need+=(python3-venv)
python3 -m pip --version >/dev/null 2>&1 || _sy_need+=(python3-pip)
[ -x /bin/kill ] || _sy_need+=(procps)
if [ ${#_sy_need[@]} -gt 0 ]; then
    echo "installing Debian packages the tests need: ${_sy_need[*]}" >&2
    _sy_sudo=
    [ "$(id -u)" = 0 ] || _sy_sudo=sudo
    # The packages' own services (etcd, prometheus) are not wanted: tests start their own.
    $_sy_sudo env DEBIAN_FRONTEND=noninteractive sh -c \
        "apt-get update -qq && apt-get install -y -qq --no-install-recommends ${_sy_need[*]} >/dev/null" ||
        { echo "system-deps.sh: apt-get install ${_sy_need[*]} failed" >&2; return 1 2>/dev/null || exit 1; }
fi
