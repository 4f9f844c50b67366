# Sourced by scripts/test.sh: a Python venv with `gguf` (gguf-py, the llama.cpp project's GGUF
# reader/writer, whose numpy quantizers and dequantizers are the independent reference the block
# formats in model::quant are tested against), made once under ~/.cache/switchyard; exports
# SWITCHYARD_GGUF_PYTHON. (python3-venv comes from scripts/system-deps.sh.)
_sy_gguf_venv="${XDG_CACHE_HOME:-$HOME/.cache}/switchyard/gguf-venv"
if ! "$_sy_gguf_venv/bin/python" -c 'import gguf.quants, numpy' >/dev/null 2>&1; then
    { python3 -m venv "$_sy_gguf_venv" &&
        "$_sy_gguf_venv/bin/pip" install --quiet --disable-pip-version-check \
            'numpy==2.4.6' 'gguf==0.19.0'; } ||
        { echo "gguf-py-env.sh: cannot make the gguf venv in $_sy_gguf_venv" >&2; return 1 2>/dev/null || exit 1; }
fi
export SWITCHYARD_GGUF_PYTHON="$_sy_gguf_venv/bin/python"
