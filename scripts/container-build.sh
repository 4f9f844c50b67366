#!/usr/bin/env bash
# Builds Switchyard's container images locally (no registry needed):
#   switchyard:VERSION        the CPU image: a static switchyard from scratch
#   switchyard-etcd:VERSION   etcd for trials and tests: this host's etcd and its libraries
#
#   scripts/container-build.sh                       # both images, with docker (or buildah)
#   scripts/container-build.sh --gpu BASE_IMAGE      # switchyard-cuda:VERSION on BASE_IMAGE
#
# The binary is built once with cargo into $CARGO_TARGET_DIR (x86_64-unknown-linux-gnu/release);
# SWITCHYARD_STATIC_BIN names one already built instead. CONTAINER_TOOL picks docker or buildah.
# The GPU image takes a dynamically linked binary (the CUDA backend dlopens libcuda, libnvrtc
# and libcublasLt); BASE_IMAGE must carry a glibc at least as new as this host's.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
gpu_base=
if [ "${1:-}" = --gpu ]; then
    gpu_base=${2:?"--gpu needs a base image, e.g. nvidia/cuda:13.0.2-runtime-ubuntu24.04"}
fi
tool=${CONTAINER_TOOL:-}
if [ -z "$tool" ]; then
    if command -v docker >/dev/null; then tool=docker
    elif command -v buildah >/dev/null; then tool=buildah
    else echo "container-build.sh: neither docker nor buildah is installed" >&2; exit 1; fi
fi
build() { # build TAG CONTAINERFILE CONTEXT [--build-arg …]
    local tag=$1 file=$2 ctx=$3
    shift 3
    case $tool in
    docker) docker build --quiet -t "$tag" -f "$file" "$@" "$ctx" >/dev/null ;;
    buildah) buildah bud --quiet -t "$tag" -f "$file" "$@" "$ctx" >/dev/null ;;
    *) echo "container-build.sh: CONTAINER_TOOL must be docker or buildah, not $tool" >&2; exit 1 ;;
    esac
    echo "built $tag" >&2
}
target_dir=${CARGO_TARGET_DIR:-target}
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/empty"

if [ -n "$gpu_base" ]; then
    cargo build --release --locked --bin switchyard
    cp "$target_dir/release/switchyard" "$ctx/switchyard"
    build "switchyard-cuda:$version" deploy/container/Containerfile "$ctx" --build-arg "BASE=$gpu_base"
    exit 0
fi

bin=${SWITCHYARD_STATIC_BIN:-}
if [ -z "$bin" ]; then
    # --target keeps build scripts and proc macros dynamic; only the binary is static.
    RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release --locked --target x86_64-unknown-linux-gnu --bin switchyard
    bin=$target_dir/x86_64-unknown-linux-gnu/release/switchyard
fi
if ldd "$bin" 2>&1 | grep -q '=>'; then # a dynamic binary names the libraries it loads
    echo "container-build.sh: $bin is dynamically linked; a scratch image needs a static one" >&2
    exit 1
fi
cp "$bin" "$ctx/switchyard"
build "switchyard:$version" deploy/container/Containerfile "$ctx"

# etcd: Debian's binary links glibc; copy it with every library ldd names.
etcd_bin=$(command -v etcd) || { echo "container-build.sh: no etcd (scripts/system-deps.sh installs etcd-server)" >&2; exit 1; }
mkdir -p "$ctx/rootfs/usr/local/bin"
cp "$(readlink -f "$etcd_bin")" "$ctx/rootfs/usr/local/bin/etcd"
for lib in $(ldd "$etcd_bin" | grep -o '/[^ ]*'); do
    mkdir -p "$ctx/rootfs$(dirname "$lib")"
    cp -L "$lib" "$ctx/rootfs$lib"
done
build "switchyard-etcd:$version" deploy/container/etcd.Containerfile "$ctx"
