# Sourced by scripts/test.sh: a Python venv with the `openai` package (the real client the HTTP
# API is tested with) and grpcio's reflection client (`grpc_reflection`, what the v1alpha
# reflection service is tested with), made once under ~/.cache/switchyard; exports
# SWITCHYARD_PYTHON. (python3-venv comes from scripts/system-deps.sh.)
_sy_venv="${XDG_CACHE_HOME:-$HOME/.cache}/switchyard/py-venv"
if ! "$_sy_venv/bin/python" -c 'import openai, grpc_reflection' >/dev/null 2>&1; then
    { python3 -m venv "$_sy_venv" &&
        "$_sy_venv/bin/pip" install --quiet --disable-pip-version-check 'openai==2.8.*' \
            'grpcio==1.85.*' 'grpcio-reflection==1.85.*'; } ||
        { echo "python-env.sh: cannot make the Python venv in $_sy_venv" >&2; return 1 2>/dev/null || exit 1; }
fi
export SWITCHYARD_PYTHON="$_sy_venv/bin/python"
