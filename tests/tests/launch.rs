//! `bd3 launch local --nproc 2`: the `bd3` binary (built by `make test`) starts itself on two
//! ranks through mpirun (as root too: the machines that run the tests often are root) and trains.

use std::process::Command;

use test_support::{bd3_binary, repo_root, run_overrides, scratch_dir};

#[test]
fn launch_local_trains_on_two_ranks() {
    let root = repo_root();
    let scratch = scratch_dir("launch");
    let run_dir = scratch.path();
    let mut sets = run_overrides(run_dir, "launch");
    sets.extend([
        "model.layers=2".into(),
        "model.seq_len=64".into(),
        "train.micro_batch=2".into(),
        "train.steps=3".into(),
        "train.log_every=1".into(),
        "train.eval_every=0".into(),
        "train.eval_batches=1".into(),
        "train.threads=1".into(),
        "train.device=\"cpu\"".into(),
        "diffusion.clip_search=false".into(),
    ]);
    let mut cmd = Command::new(bd3_binary());
    cmd.current_dir(&root).args(["launch", "local", "--nproc", "2", "train", "--config", "configs/tiny.toml"]);
    for s in &sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().expect("running bd3 launch local");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    // Each rank logs where it sits in the job when training starts.
    for rank in 0..2 {
        let started = |l: &&str| l.contains("training") && l.contains(&format!("rank={rank}")) && l.contains("world=2");
        assert!(stderr.lines().any(|l| started(&l)), "no start of training logged by rank {rank} of 2:\n{stderr}");
    }
    // Rank 0 writes the metrics: the global batch is both ranks' micro-batches.
    let metrics = std::fs::read_to_string(run_dir.join("launch/metrics.jsonl")).unwrap();
    let last = metrics.lines().rfind(|l| l.contains("\"loss\"")).expect("a training step logged");
    let last: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(last["step"], 3);
    assert_eq!(last["tokens_seen"], 3 * 2 * 2 * 64, "3 steps × micro-batch 2 × 2 ranks × 64 tokens");
}
