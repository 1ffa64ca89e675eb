//! End-to-end training on the embedded corpus (installed by scripts/setup.sh).

use test_support::{repo_root, run_overrides, scratch_dir};
use trainer::Config;

/// configs/tiny.toml, shrunk so that a run takes seconds on two cores, writing to a fresh
/// temporary run directory (removed with the returned guard).
fn quick_config(name: &str, extra: &[&str]) -> (Config, tempfile::TempDir) {
    let root = repo_root();
    let scratch = scratch_dir("train");
    let mut sets = run_overrides(scratch.path(), name);
    sets.extend([
        "model.seq_len=64".into(),
        "train.micro_batch=8".into(),
        "train.eval_every=0".into(),
        "train.eval_batches=4".into(),
        "train.sample_tokens=0".into(),
        "train.threads=2".into(),
    ]);
    sets.extend(extra.iter().map(|s| s.to_string()));
    let cfg = Config::load(&root.join("configs/tiny.toml"), &sets).expect("configs/tiny.toml with test overrides");
    (cfg, scratch)
}

#[test]
fn tiny_model_loss_falls_on_the_embedded_corpus() {
    let (cfg, _scratch) = quick_config("falls", &["train.steps=60"]);
    let out = trainer::train::train(&cfg).expect("training runs");
    let first = out.losses[0];
    let last10: f64 = out.losses[50..].iter().sum::<f64>() / 10.0;
    // Uniform over 50,257 tokens costs ln(50257) ≈ 10.8 nats per masked token; learning the
    // unigram statistics of English alone brings the NELBO well under 7.5.
    assert!(first > 10.0, "initial loss {first}");
    assert!(last10 < 7.5, "mean loss of steps 51-60 is {last10}; losses {:?}", out.losses);
    let nelbo = out.final_valid_nelbo.expect("validation split");
    assert!(nelbo < 8.0, "validation NELBO {nelbo}");
    // The run directory holds the resolved config, per-step metrics and the EMA weights.
    let metrics = std::fs::read_to_string(out.run_dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.iter().any(|l| l["step"] == 60 && l["loss"].is_f64() && l["tokens_per_s"].is_f64()));
    assert!(lines.iter().any(|l| l["valid_nelbo"].is_f64()));
    // The config as run, with what sampling needs from the data made explicit (GPT-2's ids and
    // tokenizer for the in-memory corpus).
    let mut recorded = cfg.clone();
    (recorded.data.bos_id, recorded.data.eos_id, recorded.data.tokenizer) = (Some(50256), Some(50256), "gpt2".into());
    assert_eq!(Config::load(&out.run_dir.join("config.toml"), &[]).unwrap(), recorded);
    // The clip search ran at the validation; its winner is stored with the weights.
    let clip = lines.iter().rev().find(|l| l["clip_beta"].is_f64()).expect("a clip search result");
    let weights = tch::Tensor::read_safetensors(out.run_dir.join("model.safetensors")).unwrap();
    let buffer = |name: &str| weights.iter().find(|(n, _)| n == name).unwrap().1.double_value(&[]);
    // The buffers hold the interval rounded to fp32: within 2⁻²⁴ relative of values ≤ 1.
    assert!((buffer("sampling_eps_min") - clip["clip_beta"].as_f64().unwrap()).abs() < 1e-7);
    assert!((buffer("sampling_eps_max") - clip["clip_omega"].as_f64().unwrap()).abs() < 1e-7);
}

#[test]
fn same_seed_gives_identical_losses() {
    let extra = ["train.steps=20", "model.layers=2", "train.micro_batch=4", "model.dropout=0.1"];
    let ((cfg_a, _a), (cfg_b, _b)) = (quick_config("det-a", &extra), quick_config("det-b", &extra));
    let a = trainer::train::train(&cfg_a).unwrap();
    let b = trainer::train::train(&cfg_b).unwrap();
    assert_eq!(a.losses.len(), 20);
    assert_eq!(a.losses, b.losses, "bitwise identical losses");
    assert_eq!(a.final_valid_nelbo, b.final_valid_nelbo);
    let (cfg_c, _c) = quick_config("det-c", &[&extra[..], &["train.seed=2"]].concat());
    let c = trainer::train::train(&cfg_c).unwrap();
    assert_ne!(a.losses, c.losses, "another seed gives another run");
}
