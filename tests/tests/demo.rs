//! `make demo`, end to end, with a short step budget: set-up (already done: seconds), build,
//! train the tiny model on the embedded corpus, report the validation NELBO, sample text from the
//! saved weights. Nothing it uses is shared with another run on the machine: its data set and run
//! directory are scratch directories, and its metrics endpoint takes a free port.

use std::process::Command;

use test_support::{repo_root, scratch_dir};

#[test]
fn make_demo_runs_end_to_end() {
    let root = repo_root();
    let scratch = scratch_dir("demo");
    let run_dir = scratch.path();
    let mut make = Command::new("make");
    make.current_dir(&root).args([
        "demo",
        "DEMO_STEPS=3",
        "DEMO_SAMPLE_TOKENS=32",
        "DEMO_METRICS=127.0.0.1:0",
        &format!("DEMO_RUN_DIR={}", run_dir.display()),
        &format!("DEMO_DATA={}", run_dir.join("data").display()),
    ]);
    // The test harness's cargo variables must not leak into the nested cargo build.
    for (key, _) in std::env::vars() {
        if key.starts_with("CARGO_") || key == "CARGO" {
            make.env_remove(key);
        }
    }
    let out = make.output().expect("running make");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "make demo failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("validation NELBO"), "{stdout}");
    assert!(stderr.contains("step=3"), "per-step training log: {stderr}");
    // The sample starts with BOS and is followed by generated text.
    let sample = stdout.lines().skip_while(|l| !l.contains("bd3 sample")).nth(2).unwrap_or("");
    assert!(sample.starts_with("<|endoftext|>") && sample.len() > "<|endoftext|>".len(), "{stdout}");
    assert!(run_dir.join("tiny/model.safetensors").exists());
    assert!(run_dir.join("tiny/metrics.jsonl").exists());
}
