#!/usr/bin/env bash
# NVRTC and ptxas for the kernel check (kernels/tests/ptxas.rs), with no CUDA toolkit and no GPU:
# installs NVIDIA's PyPI wheels into a cache once, then exports the paths.
#
#   source scripts/cuda-toolchain.sh      # in this shell: PATH, LD_LIBRARY_PATH, PTXAS
#   scripts/cuda-toolchain.sh             # prints the export lines (eval "$(…)")
#
# The wheels unpack to nvidia/cu13/{lib,bin,include}; libnvrtc loads libnvrtc-builtins from the
# library path, so lib/ goes on LD_LIBRARY_PATH. Our kernels include no CUDA header, so the
# runtime wheel (headers) is installed only to keep the toolchain complete for ad-hoc nvcc use.
# No `set -e` here: when sourced it would leak into the caller; failures are checked instead.
_sy_cache=${SWITCHYARD_CUDA_WHEELS:-$HOME/.cache/switchyard/cuda-wheels}
_sy_cu=$_sy_cache/nvidia/cu13
if [ ! -x "$_sy_cu/bin/ptxas" ] || [ ! -e "$_sy_cu/lib/libnvrtc.so.13" ]; then
    echo "installing NVRTC and ptxas (CUDA 13.0 wheels) into $_sy_cache" >&2
    python3 -m pip install --quiet --disable-pip-version-check --target "$_sy_cache" \
        "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" >&2 ||
        { echo "cuda-toolchain.sh: pip install failed" >&2; return 1 2>/dev/null || exit 1; }
fi
_sy_exports="export PATH=\"$_sy_cu/bin:\$PATH\"
export LD_LIBRARY_PATH=\"$_sy_cu/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\"
export PTXAS=\"$_sy_cu/bin/ptxas\""
if [ "${BASH_SOURCE[0]}" != "$0" ]; then
    eval "$_sy_exports"
else
    echo "$_sy_exports"
fi
