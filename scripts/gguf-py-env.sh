# Sourced by scripts/test.sh: a Python venv with llama.cpp's `gguf` package (gguf-py), numpy and
# sentencepiece (which gguf-py's SentencePiece vocabulary reader needs), the reference our GGUF
# reading is checked against; made once under ~/.cache/switchyard; exports SWITCHYARD_GGUF_PYTHON.
# (python3-venv comes from scripts/system-deps.sh.)
_sy_gguf_venv="${XDG_CACHE_HOME:-$HOME/.cache}/switchyard/gguf-venv"
if ! "$_sy_gguf_venv/bin/python" -c 'import gguf, numpy, sentencepiece' >/dev/null 2>&1; then
    { python3 -m venv "$_sy_gguf_venv" &&
        "$_sy_gguf_venv/bin/pip" install --quiet --disable-pip-version-check \
            'gguf==0.17.1' 'numpy==2.3.5' 'sentencepiece==0.2.3'; } ||
        { echo "gguf-py-env.sh: cannot make the gguf venv in $_sy_gguf_venv" >&2; return 1 2>/dev/null || exit 1; }
fi
export SWITCHYARD_GGUF_PYTHON="$_sy_gguf_venv/bin/python"
