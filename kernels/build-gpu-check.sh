#!/usr/bin/env bash
# Builds the CUDA parity/bench binary that kernels/gpu-check.sh runs on a GPU machine, and puts a
# copy without debug info (small enough to carry) in target/gpu/cuda_check; likewise dist-check
# with its MPI libraries, and the corpus of the training step.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -p bd3-kernels --features cuda --example cuda_check
mkdir -p target/gpu
objcopy --strip-debug target/debug/examples/cuda_check target/gpu/cuda_check
ls -l target/gpu/cuda_check >&2

# trainer's dist-check with NCCL (feature `cuda`), for gpu-check.sh's NCCL step, plus the non-system
# libraries it links (Open MPI and its dependencies): the GPU machine has torch's but maybe no MPI.
cargo build -p bd3-trainer --features cuda --bin dist-check
objcopy --strip-debug target/debug/dist-check target/gpu/dist-check
rm -rf target/gpu/lib && mkdir -p target/gpu/lib
ldd target/debug/dist-check | awk '$2 == "=>" && $3 ~ /^\// {print $3}' \
    | grep -vE 'torch|nvidia|/lib(c|m|dl|rt|pthread|gcc_s|stdc\+\+)\.so' \
    | xargs -r cp -L -t target/gpu/lib
ls -l target/gpu/dist-check target/gpu/lib >&2

# The demo corpus for gpu-check.sh's training step (configs/gpu-check-step.toml): data/ is not in
# git, so the GPU machine has it only if carried. The first 8 plays by name (about 1 MB, some 230
# training sequences of 1024 tokens) are plenty for a few steps and keep the carry small.
[ -d data/shakespeare ] || { echo "data/shakespeare is missing: run scripts/setup.sh" >&2; exit 1; }
plays=(data/shakespeare/*.txt)
rm -rf target/gpu/corpus && mkdir -p target/gpu/corpus
cp -t target/gpu/corpus "${plays[@]:0:8}"
# Everything carried must stay under the device tool's 64 MiB.
du -sh target/gpu >&2
