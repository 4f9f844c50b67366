#!/usr/bin/env bash
# Every test Switchyard has: formatting, lints, and the whole workspace's test suites
# (unit tests, the candle-transformers and Hugging Face comparisons, CLI end-to-end tests).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
