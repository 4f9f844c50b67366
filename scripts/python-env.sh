# Sourced by scripts/test.sh: a Python venv with the `openai` package (the real client the HTTP
# API is tested with), made once under ~/.cache/switchyard; exports SWITCHYARD_PYTHON.
venv="${XDG_CACHE_HOME:-$HOME/.cache}/switchyard/py-venv"
if ! "$venv/bin/python" -c 'import openai' >/dev/null 2>&1; then
    # Debian's own python3 needs python3-venv for this.
    python3 -m venv "$venv" 2>/dev/null || {
        [ "$(id -u)" -eq 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv "$venv"
    }
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'openai==2.8.*'
fi
export SWITCHYARD_PYTHON="$venv/bin/python"
