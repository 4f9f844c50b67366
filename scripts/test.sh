#!/usr/bin/env bash
# Every test Switchyard has: formatting, lints, and the whole workspace's test suites
# (unit tests, the candle-transformers and Hugging Face comparisons, CLI end-to-end tests, the
# membership and fault tests against a real etcd, and the NVRTC + ptxas check of every CUDA
# kernel, which needs no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
# NVRTC and ptxas from PyPI (installed once into a cache); the kernel check fails without them.
source scripts/cuda-toolchain.sh
# The openai package, Prometheus and Chromium the HTTP, metrics and dashboard tests use.
source scripts/python-env.sh
source scripts/system-deps.sh
# etcd-server from apt when absent; tests/membership.rs fails without it.
source scripts/etcd.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked --no-fail-fast
