#!/usr/bin/env bash
# Training tokens/s of the tiny config on 1 rank and on 2 ranks (bd3 launch local), with the same
# global batch: 1 rank × micro-batch 16 × 2 threads against 2 ranks × micro-batch 8 × 1 thread
# (the machine's two cores either way); with 2 ranks, also ZeRO-1. Prints one markdown row per
# run: the mean of the logged tokens/s windows after the first (warm-up) one.
#   scripts/bench-dist-throughput.sh [STEPS]     (default 40, logged every 10)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-40}
BD3=target/debug/bd3
cargo build -p bd3-launcher >&2
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
common=(--config configs/tiny.toml --set "train.steps=$STEPS" --set train.log_every=10 --set train.eval_every=0
    --set train.eval_batches=1 --set diffusion.clip_search=false --set train.device=\"cpu\" --set "run.dir=\"$out\"")
row() { # name ranks micro-batch threads zero
    local metrics="$out/$1/metrics.jsonl"
    python3 - "$metrics" "$1" "$2" "$3" "$4" "$5" <<'EOF'
import json, sys
path, name, ranks, mb, threads, zero = sys.argv[1:]
rates = [json.loads(l)["tokens_per_s"] for l in open(path) if '"tokens_per_s"' in l][1:]
print(f"| {ranks} | {mb} | {threads} | {zero} | {sum(rates) / len(rates):.0f} |")
EOF
}
echo "| ranks | micro-batch per rank | threads per rank | ZeRO | tokens/s |"
echo "|---|---|---|---|---|"
$BD3 train "${common[@]}" --set run.name=\"one\" --set train.micro_batch=16 --set train.threads=2 >/dev/null 2>&1
row one 1 16 2 no
$BD3 launch local --nproc 2 train "${common[@]}" --set run.name=\"two\" --set train.micro_batch=8 \
    --set train.threads=1 >/dev/null 2>&1
row two 2 8 1 no
$BD3 launch local --nproc 2 train "${common[@]}" --set run.name=\"zero\" --set train.micro_batch=8 \
    --set train.threads=1 --set dist.zero=true >/dev/null 2>&1
row zero 2 8 1 yes
