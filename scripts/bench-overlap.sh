#!/usr/bin/env bash
# Gradient reduction overlapped with backward (dist.overlap) against reduced after backward, on
# 2 ranks × 1 thread (bd3 launch local), tiny and small configs, the same run otherwise. Prints
# one markdown row per config: mean step time of each (steps after the first two), the time the
# non-overlapped step spends reducing (all-reduce + clipping; with overlap only the clipping is
# left there), and the share of the reduction the overlap hid:
#   hidden = (step_after − step_during) / (reduce_after − reduce_during).
#   scripts/bench-overlap.sh [STEPS_TINY] [STEPS_SMALL] [ZERO]     (defaults 20, 5 and false)
# With ZERO=true both runs use ZeRO-1 (dist.zero), whose buckets are reduce-scattered.
set -euo pipefail
cd "$(dirname "$0")/.."
TINY_STEPS=${1:-20}
SMALL_STEPS=${2:-5}
ZERO=${3:-false}
BD3=target/debug/bd3
cargo build -p bd3-launcher >&2
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
run() { # config steps micro-batch name overlap
    $BD3 launch local --nproc 2 train --config "configs/$1.toml" --set "train.steps=$2" --set train.log_every=1 \
        --set train.eval_every=0 --set train.eval_batches=1 --set diffusion.clip_search=false \
        --set train.sample_tokens=0 --set train.device=\"cpu\" --set train.threads=1 \
        --set "train.micro_batch=$3" --set train.grad_accum=1 --set checkpoint.every=0 \
        --set "run.dir=\"$out\"" --set "run.name=\"$4\"" --set "dist.overlap=$5" --set "dist.zero=$ZERO" >"$out/$4.log" 2>&1
}
echo "| config | ZeRO | micro-batch per rank | step, reduced after (s) | step, overlapped (s) | reduce + clip, after (s) | clip, overlapped (s) | reduction hidden |"
echo "|---|---|---|---|---|---|---|---|"
for spec in "tiny $TINY_STEPS 8" "small $SMALL_STEPS 1"; do
    read -r config steps mb <<<"$spec"
    run "$config" "$steps" "$mb" "$config-after" false
    run "$config" "$steps" "$mb" "$config-during" true
    python3 - "$out" "$config" "$mb" "$ZERO" <<'PY'
import json, sys
out, config, mb, zero = sys.argv[1:]
def means(name):
    rows = [json.loads(l) for l in open(f"{out}/{name}/metrics.jsonl") if '"step_time_s"' in l][2:]
    return (sum(r["step_time_s"] for r in rows) / len(rows), sum(r["reduce_time_s"] for r in rows) / len(rows))
(t_after, r_after), (t_during, r_during) = means(f"{config}-after"), means(f"{config}-during")
hidden = (t_after - t_during) / (r_after - r_during) if r_after > r_during else float("nan")
print(f"| {config} | {'yes' if zero == 'true' else 'no'} | {mb} | {t_after:.3f} | {t_during:.3f} | {r_after:.3f} | {r_during:.3f} | {100 * hidden:.0f} % |")
PY
done
