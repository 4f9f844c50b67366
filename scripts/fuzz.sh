#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for a bounded time from its seed corpus
# (fuzz/corpus/TARGET); a crash fails the script and leaves its input in fuzz/artifacts/TARGET.
# New inputs found go to a scratch directory, not into the repository.
#
#   scripts/fuzz.sh              # every target, 20 s each
#   scripts/fuzz.sh worker_rpc   # one target
#   SWITCHYARD_FUZZ_SECONDS=300 scripts/fuzz.sh
#
# cargo-fuzz is installed once into ~/.cache/switchyard/cargo-fuzz. It passes flags only a
# nightly compiler takes; RUSTC_BOOTSTRAP=1 lets the stable one take them. The instrumented
# build has its own target directory, kept between runs.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}
cargo_fuzz=$cache/cargo-fuzz/bin/cargo-fuzz
if [ ! -x "$cargo_fuzz" ]; then
    echo "installing cargo-fuzz into $cache/cargo-fuzz" >&2
    cargo install cargo-fuzz --locked --version 0.13.2 --root "$cache/cargo-fuzz"
fi
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR=${SWITCHYARD_FUZZ_TARGET_DIR:-$cache/fuzz-target}
seconds=${SWITCHYARD_FUZZ_SECONDS:-20}
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=($(ls fuzz/fuzz_targets | sed 's/\.rs$//'))
fi
# Panics and overflows are what Rust code can do wrong here: no sanitizer is needed, which
# keeps the build close to a plain release build.
"$cargo_fuzz" build --fuzz-dir fuzz --sanitizer none
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in "${targets[@]}"; do
    mkdir -p "$scratch/$target"
    log=$scratch/$target.log
    if ! "$cargo_fuzz" run --fuzz-dir fuzz --sanitizer none "$target" \
        "$scratch/$target" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
        >"$log" 2>&1; then
        tail -40 "$log" >&2
        echo "fuzz: $target failed; its input is in fuzz/artifacts/$target" >&2
        exit 1
    fi
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
    echo "fuzz: $target: $runs inputs in ${seconds}s, no failure"
done
