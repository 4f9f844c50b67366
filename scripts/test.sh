#!/usr/bin/env bash
# Every test Switchyard has: formatting, lints, and the whole workspace's test suites
# (unit tests, the candle-transformers and Hugging Face comparisons, CLI end-to-end tests, the
# membership and fault tests against a real etcd, the NVRTC + ptxas check of every CUDA
# kernel, which needs no GPU), then a bounded run of every fuzz target, then the container
# image, Helm chart and kustomize checks.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian packages: etcd, Prometheus, Chromium, Python's venv and pip, procps.
source scripts/system-deps.sh
# NVRTC and ptxas from PyPI (installed once into a cache); the kernel check fails without them.
source scripts/cuda-toolchain.sh
# The openai package the HTTP tests drive the API with.
source scripts/python-env.sh
# gguf-py (the llama.cpp project's package), the reference the quantized block formats are tested against.
source scripts/gguf-py-env.sh
# etcd 3.5 beside Debian's 3.4, for the etcd client's tests.
source scripts/etcd-newer.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked --no-fail-fast
# Each fuzz target for a bounded time (its own instrumented build; see the script).
scripts/fuzz.sh
# The container image, the Helm chart and the kustomize manifests: offline validation, then the
# chart's pods as Docker containers (skipped, loudly, without a Docker engine).
scripts/k8s-check.sh
