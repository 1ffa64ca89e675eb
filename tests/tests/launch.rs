//! `bd3 launch local --nproc 2`: the `bd3` binary (built by `make test`) starts itself on two
//! ranks through mpirun (as root too: the machines that run the tests often are root) and trains;
//! then evaluates the weights on 1, 2 and 3 ranks.

use std::process::Command;

use test_support::{bd3_binary, reordered_sum_bound, repo_root, run_overrides, scratch_dir};

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

    // `bd3 eval ppl` under the launcher shares its batches out over the ranks (5 batches: the
    // ranks get unequal shares) and prints the number one process does.
    let run = run_dir.join("launch");
    let eval = |nproc: usize| -> serde_json::Value {
        let mut cmd = Command::new(bd3_binary());
        cmd.current_dir(&root);
        if nproc > 1 {
            cmd.args(["launch", "local", "--nproc", &nproc.to_string()]);
        }
        cmd.args(["eval", "ppl", "--json", "--batches", "5", "--config"])
            .arg(run.join("config.toml"))
            .arg("--weights")
            .arg(run.join("model.safetensors"))
            .args(["--set", "train.threads=1"]);
        let out = cmd.output().expect("running bd3 eval ppl");
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{nproc} ranks: {}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
        let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with('{')).collect();
        assert_eq!(lines.len(), 1, "rank 0 alone prints the result:\n{stdout}");
        serde_json::from_str(lines[0]).unwrap()
    };
    let one = eval(1);
    assert_eq!(one["tokens"], 5 * 2 * 63, "5 batches of 2 sequences, 63 tokens counted in each");
    for nproc in [2, 3] {
        let shared = eval(nproc);
        assert_eq!(shared["ranks"], nproc);
        assert_eq!(shared["tokens"], one["tokens"]);
        // Each batch (same shape, own noise stream) is scored by the same code on one thread
        // whichever rank has it, so its fp64 sum is the same bits: only the order in which the 5
        // positive per-batch sums are added differs, within 2·n·u relative.
        let rel = reordered_sum_bound(5, 1.0);
        let (a, b) = (one["nll"].as_f64().unwrap(), shared["nll"].as_f64().unwrap());
        assert!((a - b).abs() <= rel * a.abs(), "NLL on {nproc} ranks {b}, on one {a} (relative tolerance {rel:e})");
    }
}
