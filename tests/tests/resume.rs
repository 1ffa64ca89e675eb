//! Exact resume, export/import and refusals, through the `bd3` binary (built by `make test`),
//! each run in a new process as after a preemption.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use test_support::{bd3_binary, repo_root, run_overrides, scratch_dir};

fn bd3(args: &[&str]) -> Output {
    Command::new(bd3_binary()).args(args).output().expect("running bd3")
}

fn ok(out: Output) -> String {
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "bd3 failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    stdout.into_owned()
}

fn failure(out: Output) -> String {
    assert!(!out.status.success(), "bd3 should have failed: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `bd3 train` on a small model (dropout on, so libtorch's RNG matters), validating and saving
/// every 3 steps.
fn train(run_dir: &Path, name: &str, steps: u64, extra: &[&str]) -> Output {
    train_with_env(run_dir, name, steps, extra, &[])
}

fn train_with_env(run_dir: &Path, name: &str, steps: u64, extra: &[&str], env: &[(String, String)]) -> Output {
    let root = repo_root();
    let run = run_overrides(run_dir, name);
    let steps = format!("train.steps={steps}");
    let mut args = vec!["train", "--config", "configs/tiny.toml"];
    for s in [
        run[0].as_str(),
        &run[1],
        &run[2],
        &run[3],
        &steps,
        "model.layers=2",
        "model.seq_len=64",
        "model.dropout=0.1",
        "train.micro_batch=4",
        "train.log_every=1",
        "train.eval_every=3",
        "train.eval_batches=2",
        "train.threads=2",
        "checkpoint.every=3",
        "checkpoint.keep_latest=2",
    ] {
        args.extend(["--set", s]);
    }
    args.extend(extra);
    Command::new(bd3_binary())
        .current_dir(root)
        .args(&args)
        .envs(env.iter().cloned())
        .output()
        .expect("running bd3 train")
}

/// step → training loss from a run's metrics log.
fn losses(run: &Path) -> BTreeMap<u64, f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["loss"].is_f64())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

#[test]
fn resumed_training_is_bit_exact_and_exports_round_trip() {
    let scratch = scratch_dir("resume");
    let tmp = scratch.path();

    // 6 steps straight; 3 steps, then a new process resumes for 3 more.
    ok(train(tmp, "straight", 6, &[]));
    ok(train(tmp, "split", 3, &[]));
    let stderr = String::from_utf8_lossy(&train(tmp, "split", 6, &["--resume", "auto"]).stderr).into_owned();
    assert!(stderr.contains("resumed") && stderr.contains("step=3"), "{stderr}");

    let (a, b) = (losses(&tmp.join("straight")), losses(&tmp.join("split")));
    assert_eq!(a.len(), 6);
    assert_eq!(a, b, "per-step losses must be identical");
    let read = |run: &str, file: &str| std::fs::read(tmp.join(run).join(file)).unwrap();
    assert_eq!(read("straight", "model.safetensors"), read("split", "model.safetensors"), "final EMA weights");
    let shard = "checkpoints/step-0000000006/rank-00000-000.safetensors";
    assert_eq!(read("straight", shard), read("split", shard), "final weights, EMA and optimizer state");
    // Retention kept the latest two.
    let ckpts = tmp.join("split/checkpoints");
    let ls = ok(bd3(&["ckpt", "ls", ckpts.to_str().unwrap()]));
    assert!(ls.contains("committed") && !ls.contains("incomplete"), "{ls}");
    ok(bd3(&["ckpt", "verify", ckpts.to_str().unwrap()]));

    // A corrupt shard in the newest step: resume falls back to step 3, naming the file, and the
    // replayed steps are the same as before.
    let newest = tmp.join("split").join(shard);
    let mut bytes = std::fs::read(&newest).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&newest, bytes).unwrap();
    let out = train(tmp, "split", 6, &["--resume", "auto"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("step-0000000006/rank-00000-000.safetensors") && stderr.contains("step=3"), "{stderr}");
    assert_eq!(losses(&tmp.join("split")), a);

    // Starting fresh over existing checkpoints is refused; so is a model of other shapes.
    let err = failure(train(tmp, "split", 9, &[]));
    assert!(err.contains("--resume auto"), "{err}");
    let err = failure(train(tmp, "split", 9, &["--resume", "auto", "--set", "model.hidden=64"]));
    assert!(err.contains("model.hidden"), "{err}");

    // Export → import → export gives the same bytes, under the model's own key names and shapes.
    let first = tmp.join("first.safetensors");
    let second = tmp.join("second.safetensors");
    ok(bd3(&["ckpt", "export", ckpts.to_str().unwrap(), "--out", first.to_str().unwrap()]));
    let imported = tmp.join("imported");
    let cfg = tmp.join("split/config.toml");
    ok(bd3(&[
        "ckpt",
        "import",
        first.to_str().unwrap(),
        imported.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ]));
    ok(bd3(&["ckpt", "export", imported.to_str().unwrap(), "--out", second.to_str().unwrap()]));
    assert_eq!(std::fs::read(&first).unwrap(), std::fs::read(&second).unwrap());
    // The export holds exactly the EMA weights the run saved as model.safetensors.
    let exported: BTreeMap<String, tch::Tensor> = tch::Tensor::read_safetensors(&first).unwrap().into_iter().collect();
    let saved: BTreeMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(tmp.join("split/model.safetensors")).unwrap().into_iter().collect();
    assert_eq!(exported.keys().collect::<Vec<_>>(), saved.keys().collect::<Vec<_>>());
    for (k, t) in &exported {
        assert_eq!(t.size(), saved[k].size(), "{k}");
        assert!(t.equal(&saved[k]), "{k}");
    }
    // An import checked against a different model names the problem.
    let err = failure(bd3(&[
        "ckpt",
        "import",
        first.to_str().unwrap(),
        tmp.join("bad").to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "model.layers=3",
    ]));
    assert!(err.contains("blocks.2"), "{err}");
}

#[test]
fn training_resumes_exactly_from_an_s3_server() {
    let server = dataloader::testing::S3TestServer::start().unwrap();
    server.create_bucket("runs").unwrap();
    // Credentials and endpoint reach bd3 the standard way: AWS_* environment variables.
    let env: Vec<(String, String)> = server.options().into_iter().map(|(k, v)| (k.to_uppercase(), v)).collect();
    let scratch = scratch_dir("resume-s3");
    let tmp = scratch.path();
    let s3 = ["--set", "checkpoint.url=s3://runs/split/checkpoints"];
    ok(train(tmp, "straight", 6, &[]));
    ok(train_with_env(tmp, "split", 3, &s3, &env));
    ok(train_with_env(tmp, "split", 6, &[&s3[..], &["--resume", "auto"]].concat(), &env));
    assert_eq!(losses(&tmp.join("straight")), losses(&tmp.join("split")));
    let read = |run: &str| std::fs::read(tmp.join(run).join("model.safetensors")).unwrap();
    assert_eq!(read("straight"), read("split"));
    // The checkpoints live on the server (its data directory), not on local disk.
    assert!(server.root().join("runs/split/checkpoints/step-0000000006/COMMITTED").is_file());
    assert!(!tmp.join("split/checkpoints").exists());
}

#[test]
fn training_from_prepared_shards_resumes_exactly() {
    let scratch = scratch_dir("resume-shards");
    let tmp = scratch.path();
    let data = tmp.join("data");
    let corpus = repo_root().join("data/shakespeare");
    ok(bd3(&[
        "prepare",
        "--input",
        corpus.to_str().unwrap(),
        "--output",
        data.to_str().unwrap(),
        "--seq-len",
        "64",
        "--valid-documents",
        "2",
        "--row-group-sequences",
        "512",
    ]));
    let dataset = format!("data.dataset={:?}", data.display().to_string());
    let set = ["--set", dataset.as_str()];
    ok(train(tmp, "straight", 6, &set));
    ok(train(tmp, "split", 3, &set));
    ok(train(tmp, "split", 6, &[&set[..], &["--resume", "auto"]].concat()));
    assert_eq!(losses(&tmp.join("straight")), losses(&tmp.join("split")));
    let read = |run: &str| std::fs::read(tmp.join(run).join("model.safetensors")).unwrap();
    assert_eq!(read("straight"), read("split"));
    // The reader's position is part of the checkpoint.
    let inspect = ok(bd3(&["ckpt", "inspect", tmp.join("split/checkpoints").to_str().unwrap()]));
    assert!(inspect.contains("\"consumed\":24"), "{inspect}");
}
