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
# trainer::dist::nccl), the binary's probe, bf16 parity + benchmark, fp16 parity (quick set), and
# FlexAttention/dense SDPA from Python at the benchmark shape.
# Env: PYTHON (default python3), GPU_CHECK_QUICK=1 for small shapes, GPU_CHECK_SKIP_PREFLIGHT=1
# to run the CPU mode of the binary on a machine without a GPU (tests this script).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
BIN=${1:-$root/target/gpu/cuda_check}
PY=${PYTHON:-python3}
QUICK=${GPU_CHECK_QUICK:-0}
SKIP=${GPU_CHECK_SKIP_PREFLIGHT:-0}
work=$(mktemp -d)
trap '[ "${GPU_CHECK_KEEP:-0}" = 1 ] || rm -rf "$work"' EXIT

log() { printf '[gpu-check] %s\n' "$*" >&2; }
# Every step records {"ok": bool, "detail": ...} under its name; the summary is built at the end.
record() { # name ok detail-json
    printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$work/steps.tsv"
}
json_str() { "$PY" -c 'import json,sys; print(json.dumps(sys.stdin.read().strip()[-2000:]))'; }

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
if [ ! -x "$BIN" ]; then
    record binary false "\"$BIN is missing (build it with kernels/build-gpu-check.sh and carry target/gpu)\""; finish
fi
missing=$(ldd "$BIN" | grep "not found" || true)
if [ -n "$missing" ]; then
    record ldd false "$(json_str <<<"$missing")"; finish
fi
record ldd true '"all libraries resolve"'

# --- the binary ----------------------------------------------------------------------------
run_bin() { # name args...
    local name=$1; shift
    log "cuda_check $*"
    if "$BIN" "$@" >"$work/$name.json" 2>"$work/$name.err"; then
        local pass
        pass=$("$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(str(d.get("parity_pass", d.get("cuda_tensor", False))).lower())' "$work/$name.json" 2>/dev/null || echo false)
        record "$name" "$pass" "$(cat "$work/$name.json")"
    else
        record "$name" false "$(json_str <"$work/$name.err")"
    fi
}
# --- NCCL collectives: trainer's dist-check on 1 rank (no mpirun; the MPI libraries it links are
# carried in target/gpu/lib). Every collective, f32/f64/bf16, odd sizes, against a serial reference.
NCCL_BIN=${GPU_CHECK_NCCL_BIN:-$root/target/gpu/dist-check}
nccl_check() { # name expect: "pass" (a GPU) or "no-gpu" (CPU mode: a clear error is the pass)
    if [ ! -x "$NCCL_BIN" ]; then
        record "$1" false "\"$NCCL_BIN is missing (build it with kernels/build-gpu-check.sh)\""; return
    fi
    local out
    out=$(LD_LIBRARY_PATH="$torch_dir/../nvidia/nccl/lib:$(dirname "$NCCL_BIN")/lib:$LD_LIBRARY_PATH" \
        "$NCCL_BIN" nccl-collectives 2>&1)
    local rc=$?
    if [ "$2" = pass ] && [ $rc = 0 ] && grep -q "checks passed" <<<"$out"; then
        record "$1" true "$(json_str <<<"$out")"
    elif [ "$2" = no-gpu ] && [ $rc != 0 ] && grep -q "needs a CUDA device" <<<"$out"; then
        record "$1" true "$(json_str <<<"$out")"
    else
        record "$1" false "$(json_str <<<"$out")"
    fi
}
quick=(); [ "$QUICK" = 1 ] && quick=(--quick)
if [ "$SKIP" = 1 ]; then
    run_bin cpu_parity --device cpu --dtype f32 --quick --bench --iters 1
    nccl_check nccl_without_gpu no-gpu
    finish
fi
nccl_check nccl pass
run_bin probe --probe
run_bin bf16 --device cuda --dtype bf16 --bench "${quick[@]}"
run_bin fp16 --device cuda --dtype fp16 --quick

# --- FlexAttention from this machine's PyTorch --------------------------------------------------
log "flex_bench.py"
if "$PY" "$here/flex_bench.py" "${quick[@]}" >"$work/flex.json" 2>"$work/flex.err"; then
    record flex true "$(cat "$work/flex.json")"
else
    record flex false "$(json_str <"$work/flex.err")"
fi
finish
