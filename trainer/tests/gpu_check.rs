//! `kernels/gpu-check.sh` in its CPU mode (GPU_CHECK_SKIP_PREFLIGHT=1), steps `train_step` and
//! `overlap_cpu`: the script runs this build's `dist-check step-bench` on a tiny fp32 model with
//! each CPU attention backend, and `dist-check overlap cpu` (the CPU twin of its `nccl_overlap`),
//! and records their JSON lines. (The script's other CPU-mode steps need the binaries built
//! with the feature `cuda` by kernels/build-gpu-check.sh, so GPU_CHECK_ONLY leaves them out.)

use std::process::Command;

use serde_json::Value;
use test_support::repo_root;

#[test]
fn gpu_check_cpu_mode_records_a_training_step_per_backend_and_the_overlap_check() {
    let root = repo_root();
    let out = Command::new("bash")
        .arg(root.join("kernels/gpu-check.sh"))
        .current_dir(&root)
        .env("GPU_CHECK_SKIP_PREFLIGHT", "1")
        .env("GPU_CHECK_ONLY", "train_step,overlap_cpu")
        .env("GPU_CHECK_DIST_BIN", env!("CARGO_BIN_EXE_dist-check"))
        // The preflight wants torch 2.11.0 from this Python: the venv of scripts/setup.sh.
        .env("PYTHON", root.join(".venv/bin/python"))
        .output()
        .expect("running kernels/gpu-check.sh");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let context = format!("exit {}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    let summary: Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: not one JSON summary\n{context}"));

    let step = &summary["steps"]["train_step"];
    assert_eq!(step["ok"], true, "{context}");
    let report = &step["detail"];
    assert_eq!(report["device"], "cpu", "{context}");
    assert_eq!(report["dtype"], "fp32", "{context}");
    assert_eq!(report["agree"], true, "{context}");
    let backends = report["backends"].as_array().unwrap_or_else(|| panic!("no backends\n{context}"));
    let names: Vec<_> = backends.iter().map(|b| b["backend"].as_str().unwrap_or("?")).collect();
    assert_eq!(names, ["dense", "sdpa-tiles"], "{context}");
    for b in backends {
        for field in ["tokens_per_s", "step_ms"] {
            let value = b[field].as_f64().unwrap_or(0.0);
            assert!(value > 0.0, "{field} of {b}\n{context}");
        }
        // A fresh model's loss is about ln(vocabulary) ≈ 10.8 nats per token.
        let loss = b["loss"].as_f64().unwrap_or(f64::NAN);
        assert!(loss > 5.0 && loss < 15.0, "loss of {b}\n{context}");
        // No peak FLOP/s is known for a CPU: MFU is null, not a made-up number.
        assert!(b["mfu"].is_null(), "mfu of {b}\n{context}");
    }
    let overlap = &summary["steps"]["overlap_cpu"];
    assert_eq!(overlap["ok"], true, "{context}");
    assert_eq!(overlap["detail"]["bitwise_equal"], true, "{context}");
    assert_eq!(overlap["detail"]["ordered"], true, "{context}");
    assert!(overlap["detail"]["overlapped_ms"].as_f64().unwrap_or(0.0) > 0.0, "{context}");
    assert!(out.status.success(), "{context}");
    assert_eq!(summary["ok"], true, "{context}");
}
