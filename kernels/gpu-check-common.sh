# Sourced by kernels/gpu-check-correctness and kernels/gpu-check-timing (on the device machine):
# flags, the bundle kernels/gpu-check-build made, where results go, NVRTC's library path, and
# `gpu`, which runs a command that needs the GPU, or under --dry-run only prints it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bundle=target/gpu-check
dry=0
for arg in "$@"; do
    case $arg in
    --dry-run) dry=1 ;;
    *) echo "unknown flag $arg (the only flag is --dry-run)" >&2; exit 2 ;;
    esac
done
for f in gpu_check switchyard; do
    [ -x "$bundle/$f" ] || { echo "no $bundle/$f: run kernels/gpu-check-build first" >&2; exit 1; }
done
# $OUT is the device call's folder of results (at most 8 files come back).
out=${OUT:-$PWD/$bundle/out}/$(basename "$0" | sed 's/^gpu-check-//')
mkdir -p "$out"
export SWITCHYARD_KERNEL_CACHE=/tmp/switchyard-kernel-cache

# NVRTC from PyTorch's wheels when there is no toolkit.
nvrtc_dir=$(python3 - <<'PY' 2>/dev/null || true
import glob, os, site
for base in site.getsitepackages():
    for lib in glob.glob(os.path.join(base, "nvidia", "*", "lib")):
        if glob.glob(os.path.join(lib, "libnvrtc.so*")):
            print(lib); raise SystemExit
PY
)
[ -n "$nvrtc_dir" ] && export LD_LIBRARY_PATH="$nvrtc_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

gpu() {
    if [ "$dry" = 1 ]; then
        echo "[dry-run] $*"
    else
        "$@"
    fi
}

# `gpu_check SECONDS FILTER...`: runs the gpu_check tests the filters select, one at a time,
# for at most SECONDS (a dry run lists them instead).
gpu_check() {
    local limit=$1
    shift
    if [ "$dry" = 1 ]; then
        "$bundle/gpu_check" --ignored --list "$@"
    else
        timeout "$limit" "$bundle/gpu_check" --ignored --test-threads=1 --nocapture "$@"
    fi
}

stage() { echo "== $* (at ${SECONDS}s)"; }
