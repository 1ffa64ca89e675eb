#!/usr/bin/env bash
# Builds the CUDA parity/bench binary that kernels/gpu-check.sh runs on a GPU machine, and puts a
# copy without debug info (small enough to carry) in target/gpu/cuda_check.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -p bd3-kernels --features cuda --example cuda_check
mkdir -p target/gpu
objcopy --strip-debug target/debug/examples/cuda_check target/gpu/cuda_check
ls -l target/gpu/cuda_check >&2
