# Sourced by scripts/test.sh after gguf-py-env.sh: Mistral 7B / Mixtral 8x7B's SentencePiece model
# (tokenizer.model.v1, Apache-2.0, as shipped in the PyPI wheel mistral-common==1.13.1, the
# version model/tests/data/mistral-v1-tokenizer's vectors were made with), which the GGUF
# tokenizer tests write into a GGUF with gguf-py. Fetched once with pip, checked against the
# sha256 of the wheel's RECORD, cached under ~/.cache/switchyard/models; exports
# SWITCHYARD_MISTRAL_SPM.
_sy_spm_file="${XDG_CACHE_HOME:-$HOME/.cache}/switchyard/models/mistral-tokenizer.model.v1"
# RECORD: sha256=2t_VbXZnFcYdLveApSWrQ7jm2k3mhlvaPZX9714TQFU (urlsafe base64), 493443 bytes.
_sy_spm_sha=dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055
_sy_spm_fetch() {
    local tmp rc
    tmp="$(mktemp -d)" || return 1
    mkdir -p "$(dirname "$_sy_spm_file")" &&
        "$SWITCHYARD_GGUF_PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps \
            'mistral-common==1.13.1' -d "$tmp" &&
        "$SWITCHYARD_GGUF_PYTHON" -m zipfile -e "$tmp/mistral_common-1.13.1-py3-none-any.whl" "$tmp/x" &&
        echo "$_sy_spm_sha  $tmp/x/mistral_common/data/tokenizer.model.v1" | sha256sum --check --quiet &&
        mv "$tmp/x/mistral_common/data/tokenizer.model.v1" "$_sy_spm_file"
    rc=$?
    rm -rf "$tmp"
    return $rc
}
if ! echo "$_sy_spm_sha  $_sy_spm_file" | sha256sum --check --status 2>/dev/null; then
    _sy_spm_fetch || { echo "mistral-spm.sh: cannot fetch Mistral's tokenizer.model into $_sy_spm_file" >&2; return 1 2>/dev/null || exit 1; }
fi
export SWITCHYARD_MISTRAL_SPM="$_sy_spm_file"
