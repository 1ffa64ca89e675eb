#!/usr/bin/env bash
# The CUDA check of bd3's fused attention, in one call on a GPU machine (PyTorch 2.11.0 in its
# Python, no Rust, no network). Prints one JSON summary on stdout; details go to stderr.
#
#   kernels/gpu-check.sh [BINARY]        BINARY defaults to target/gpu/cuda_check
#
# The binary is built on the CPU machine with the CUDA objects and carried here:
#   kernels/build-gpu-check.sh           (= cargo build --example cuda_check --features cuda, stripped copy in target/gpu/)
# then, e.g. through the device tool: run(command="kernels/gpu-check.sh", carry=["target/gpu"]).
#
# Steps: preflight (glibc ≥ 2.34, torch 2.11.0, CUDA tensor from Python, the binary's libraries
# resolve against this machine's torch), then NCCL collectives on 1 rank (target/gpu/dist-check,
# trainer::dist::nccl), gradient reduction overlapped with backward over NCCL on 1 rank
# (`nccl_overlap`: dist-check overlap cuda; bit-identical to reducing after backward, with the time
# of each and the all-reduce bandwidth), the binary's probe, bf16 parity + benchmark, fp16 parity (quick set), a
# bf16 training step of configs/gpu-check-step.toml with each attention backend (`train_step`:
# dist-check step-bench; tokens/s, MFU, and whether the backends' losses agree), and
# FlexAttention/dense SDPA from Python at the benchmark shape.
# Env: PYTHON (default python3), GPU_CHECK_QUICK=1 for small shapes, GPU_CHECK_SKIP_PREFLIGHT=1
# to run the CPU mode of the binaries on a machine without a GPU (tests this script),
# GPU_CHECK_ONLY=name,… to run only those steps after the preflight (a rerun of one step within
# the device budget; trainer/tests/gpu_check.rs), GPU_CHECK_DIST_BIN for another dist-check,
# GPU_CHECK_STEP_TIMEOUT (seconds, default 240) for the training step.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
BIN=${1:-$root/target/gpu/cuda_check}
PY=${PYTHON:-python3}
QUICK=${GPU_CHECK_QUICK:-0}
SKIP=${GPU_CHECK_SKIP_PREFLIGHT:-0}
ONLY=${GPU_CHECK_ONLY:-}
work=$(mktemp -d)
trap '[ "${GPU_CHECK_KEEP:-0}" = 1 ] || rm -rf "$work"' EXIT

log() { printf '[gpu-check] %s\n' "$*" >&2; }
# Every step records {"ok": bool, "detail": ...} under its name; the summary is built at the end.
record() { # name ok detail-json
    printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$work/steps.tsv"
}
json_str() { "$PY" -c 'import json,sys; print(json.dumps(sys.stdin.read().strip()[-2000:]))'; }
# Whether step $1 runs: every step, or those GPU_CHECK_ONLY names.
want() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

summary() {
    "$PY" - "$work/steps.tsv" <<'EOF'
import json, sys
steps, ok = {}, True
for line in open(sys.argv[1]):
    name, good, detail = line.rstrip("\n").split("\t", 2)
    try:
        detail = json.loads(detail)
    except Exception:
        pass
    steps[name] = {"ok": good == "true", "detail": detail}
    ok &= good == "true"
print(json.dumps({"ok": ok, "steps": steps}))
sys.exit(0 if ok else 1)
EOF
}
# Exit status: 0 when every step passed, 1 otherwise (the summary says which).
finish() { summary; exit $?; }
: >"$work/steps.tsv"

# --- preflight ---------------------------------------------------------------------------
ldd_version=$(ldd --version 2>&1 || true)  # (no `| head`: SIGPIPE would fail the pipeline)
glibc=$(grep -oE '[0-9]+\.[0-9]+$' <<<"${ldd_version%%$'\n'*}" || true)
glibc=${glibc:-0.0}
if [ "$(printf '%s\n2.34\n' "$glibc" | sort -V | head -1)" = "2.34" ]; then
    record glibc true "\"$glibc\""
else
    record glibc false "\"$glibc (need >= 2.34)\""; finish
fi

torch_info=$("$PY" -c 'import os, torch; print(torch.__version__); print(os.path.dirname(torch.__file__))' 2>"$work/py.err")
if [ -z "$torch_info" ]; then
    record torch false "$(json_str <"$work/py.err")"; finish
fi
torch_version=$(sed -n 1p <<<"$torch_info")
torch_dir=$(sed -n 2p <<<"$torch_info")
case "$torch_version" in
    2.11.0*) record torch true "\"$torch_version at $torch_dir\"" ;;
    *) record torch false "\"$torch_version (need 2.11.0)\""; finish ;;
esac

if [ "$SKIP" != 1 ]; then
    if out=$("$PY" -c 'import torch; x = torch.ones(4, device="cuda"); print(torch.cuda.get_device_name(0), float(x.sum()))' 2>&1); then
        record python_cuda_tensor true "$(json_str <<<"$out")"
    else
        record python_cuda_tensor false "$(json_str <<<"$out")"; finish
    fi
fi

# The binary's RUNPATH points at the build machine's torch; this machine's libraries come first.
export LD_LIBRARY_PATH="$torch_dir/lib:$torch_dir/../nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# cuda_check is there and its libraries resolve (where one of its steps runs).
if want cpu_parity || want probe || want bf16 || want fp16; then
    if [ ! -x "$BIN" ]; then
        record binary false "\"$BIN is missing (build it with kernels/build-gpu-check.sh and carry target/gpu)\""; finish
    fi
    missing=$(ldd "$BIN" | grep "not found" || true)
    if [ -n "$missing" ]; then
        record ldd false "$(json_str <<<"$missing")"; finish
    fi
    record ldd true '"all libraries resolve"'
fi

# --- the binary ----------------------------------------------------------------------------
run_bin() { # name args...
    local name=$1; shift
    want "$name" || return 0
    log "cuda_check $*"
    if "$BIN" "$@" >"$work/$name.json" 2>"$work/$name.err"; then
        local pass
        pass=$("$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(str(d.get("parity_pass", d.get("cuda_tensor", False))).lower())' "$work/$name.json" 2>/dev/null || echo false)
        record "$name" "$pass" "$(cat "$work/$name.json")"
    else
        record "$name" false "$(json_str <"$work/$name.err")"
    fi
}
# --- trainer's dist-check (no mpirun; the MPI libraries it links are carried in target/gpu/lib).
DIST_BIN=${GPU_CHECK_DIST_BIN:-${GPU_CHECK_NCCL_BIN:-$root/target/gpu/dist-check}}
dist_libs="$torch_dir/../nvidia/nccl/lib:$(dirname "$DIST_BIN")/lib:$LD_LIBRARY_PATH"
# NCCL collectives on 1 rank: every collective, f32/f64/bf16, odd sizes, against a serial reference.
nccl_check() { # name expect: "pass" (a GPU) or "no-gpu" (CPU mode: a clear error is the pass)
    want "$1" || return 0
    if [ ! -x "$DIST_BIN" ]; then
        record "$1" false "\"$DIST_BIN is missing (build it with kernels/build-gpu-check.sh)\""; return
    fi
    local out
    out=$(LD_LIBRARY_PATH=$dist_libs "$DIST_BIN" nccl-collectives 2>&1)
    local rc=$?
    if [ "$2" = pass ] && [ $rc = 0 ] && grep -q "checks passed" <<<"$out"; then
        record "$1" true "$(json_str <<<"$out")"
    elif [ "$2" = no-gpu ] && [ $rc != 0 ] && grep -q "needs a CUDA device" <<<"$out"; then
        record "$1" true "$(json_str <<<"$out")"
    else
        record "$1" false "$(json_str <<<"$out")"
    fi
}
# A small-model training step per attention backend (dist-check step-bench): its JSON line is the
# detail; the pass is exit 0 with the backends' losses in agreement ("agree"). Under a timeout
# (GPU_CHECK_STEP_TIMEOUT seconds): a hang in the fused kernels, never run on a GPU yet, must not
# take the rest of the summary with it; stderr then says how far each backend got.
train_step() { # name step-bench-args...
    local name=$1; shift
    want "$name" || return 0
    if [ ! -x "$DIST_BIN" ]; then
        record "$name" false "\"$DIST_BIN is missing (build it with kernels/build-gpu-check.sh)\""; return
    fi
    # The demo corpus, carried in target/gpu/corpus (data/ is not in git, so not on the GPU machine).
    local corpus=$root/target/gpu/corpus
    [ -d "$corpus" ] || corpus=$root/data/shakespeare
    log "dist-check step-bench $*"
    LD_LIBRARY_PATH=$dist_libs timeout "${GPU_CHECK_STEP_TIMEOUT:-240}" "$DIST_BIN" step-bench \
        "$root/configs/gpu-check-step.toml" "data.corpus=\"$corpus\"" "$@" >"$work/$name.json" 2>"$work/$name.err"
    local rc=$? verdict
    verdict=$("$PY" - "$work/$name.json" "$work/$name.err" "$rc" <<'EOF'
import json, sys
out, err, rc = open(sys.argv[1]).read(), open(sys.argv[2]).read(), int(sys.argv[3])
try:
    report = json.loads(out.strip().splitlines()[-1])
except Exception:
    report = None
ok = rc == 0 and isinstance(report, dict) and report.get("agree") is True
print("true" if ok else "false")
print(json.dumps(report if ok else {"exit": rc, "report": report, "stderr": err.strip()[-2000:]}))
EOF
) || verdict=$'false\n"could not read the output of dist-check step-bench"'
    record "$name" "$(sed -n 1p <<<"$verdict")" "$(sed -n 2p <<<"$verdict")"
}
# Gradients averaged while backward runs (dist-check overlap: over NCCL on a communication stream
# on a GPU, over the CPU otherwise) against the same collectives after backward. The pass is exit 0
# with bit-identical gradients; the JSON line (times, bandwidth) is the detail.
overlap_step() { # name device
    want "$1" || return 0
    if [ ! -x "$DIST_BIN" ]; then
        record "$1" false "\"$DIST_BIN is missing (build it with kernels/build-gpu-check.sh)\""; return
    fi
    log "dist-check overlap $2"
    local out rc
    out=$(LD_LIBRARY_PATH=$dist_libs timeout 120 "$DIST_BIN" overlap "$2" 2>&1)
    rc=$?
    local line
    line=$(sed -n 's/^rank 0 OVERLAP //p' <<<"$out")
    if [ $rc = 0 ] && [ -n "$line" ]; then
        record "$1" true "$line"
    else
        record "$1" false "$(json_str <<<"exit $rc: $out")"
    fi
}
quick=(); [ "$QUICK" = 1 ] && quick=(--quick)
if [ "$SKIP" = 1 ]; then
    run_bin cpu_parity --device cpu --dtype f32 --quick --bench --iters 1
    nccl_check nccl_without_gpu no-gpu
    overlap_step overlap_cpu cpu
    # The same step on a tiny fp32 CPU model, so that this mode exercises it.
    train_step train_step --steps 2 train.device=cpu train.bf16=false model.hidden=64 model.layers=2 \
        model.heads=2 model.cond_dim=32 model.seq_len=64 train.micro_batch=2 train.threads=1
    finish
fi
nccl_check nccl pass
overlap_step nccl_overlap cuda
run_bin probe --probe
run_bin bf16 --device cuda --dtype bf16 --bench "${quick[@]}"
run_bin fp16 --device cuda --dtype fp16 --quick
bench_steps=10; [ "$QUICK" = 1 ] && bench_steps=3
train_step train_step --steps "$bench_steps"

# --- FlexAttention from this machine's PyTorch --------------------------------------------------
if want flex; then
    log "flex_bench.py"
    if "$PY" "$here/flex_bench.py" "${quick[@]}" >"$work/flex.json" 2>"$work/flex.err"; then
        record flex true "$(cat "$work/flex.json")"
    else
        record flex false "$(json_str <"$work/flex.err")"
    fi
fi
finish
