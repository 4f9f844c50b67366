# Sourced by the llama.cpp reference and benchmark scripts (not by scripts/test.sh: the build
# takes 12-25 minutes on two cores): llama.cpp 0.3.36 as the PyPI sdist of llama-cpp-python,
# built from source once into a venv under ~/.cache/switchyard, and the same sdist unpacked
# beside it for llama.cpp's own converter (vendor/llama.cpp/convert_hf_to_gguf.py and its
# gguf-py). Exports SWITCHYARD_LLAMA_PYTHON (the venv's python: `import llama_cpp`) and
# SWITCHYARD_LLAMA_CPP_SRC (the unpacked vendor/llama.cpp).
_sy_llama_version=0.3.36
_sy_llama_sha=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
_sy_llama_url="https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-$_sy_llama_version.tar.gz"
_sy_llama_cache="${XDG_CACHE_HOME:-$HOME/.cache}/switchyard"
_sy_llama_venv="$_sy_llama_cache/llama-venv"
_sy_llama_src="$_sy_llama_cache/llama_cpp_python-$_sy_llama_version"
_sy_llama_fail() { echo "llama-cpp-env.sh: $*" >&2; return 1; }
if [ ! -f "$_sy_llama_src/vendor/llama.cpp/convert_hf_to_gguf.py" ]; then
    _sy_tmp="$(mktemp -d)" &&
        curl -fsSL -o "$_sy_tmp/sdist.tar.gz" "$_sy_llama_url" &&
        echo "$_sy_llama_sha  $_sy_tmp/sdist.tar.gz" | sha256sum --check --quiet &&
        tar xzf "$_sy_tmp/sdist.tar.gz" -C "$_sy_llama_cache" ||
        { rm -rf "$_sy_tmp"; _sy_llama_fail "cannot fetch and unpack $_sy_llama_url"; return 1 2>/dev/null || exit 1; }
    rm -rf "$_sy_tmp"
fi
if ! "$_sy_llama_venv/bin/python" -c 'import llama_cpp, numpy' >/dev/null 2>&1; then
    echo "llama-cpp-env.sh: building llama.cpp $_sy_llama_version into $_sy_llama_venv (12-25 minutes)" >&2
    # Native CPU code (AVX2 / AVX-512 as this machine has), the library only.
    { python3 -m venv "$_sy_llama_venv" &&
        CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DGGML_NATIVE=ON" \
        CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        "$_sy_llama_venv/bin/pip" install --quiet --disable-pip-version-check \
            "$_sy_llama_src" 'numpy==2.4.6'; } ||
        { _sy_llama_fail "cannot build llama-cpp-python in $_sy_llama_venv"; return 1 2>/dev/null || exit 1; }
fi
export SWITCHYARD_LLAMA_PYTHON="$_sy_llama_venv/bin/python"
export SWITCHYARD_LLAMA_CPP_SRC="$_sy_llama_src/vendor/llama.cpp"
