//! End-to-end training on the embedded corpus (installed by scripts/setup.sh).

use std::path::PathBuf;

use trainer::Config;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// configs/tiny.toml, shrunk so that a run takes seconds on two cores, writing to a fresh
/// temporary run directory.
fn quick_config(name: &str, extra: &[&str]) -> Config {
    let root = repo_root();
    let run_dir = std::env::temp_dir().join(format!("bd3-test-{}-{name}", std::process::id()));
    let mut sets: Vec<String> = vec![
        format!("data.corpus={:?}", root.join("data/shakespeare").display().to_string()),
        format!("run.dir={:?}", run_dir.display().to_string()),
        format!("run.name={name:?}"),
        "model.seq_len=64".into(),
        "train.micro_batch=8".into(),
        "train.eval_every=0".into(),
        "train.eval_batches=4".into(),
        "train.sample_tokens=0".into(),
        "train.threads=2".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    Config::load(&root.join("configs/tiny.toml"), &sets).expect("configs/tiny.toml with test overrides")
}

#[test]
fn tiny_model_loss_falls_on_the_embedded_corpus() {
    let cfg = quick_config("falls", &["train.steps=60"]);
    let out = trainer::train::run(&cfg).expect("training runs");
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
    assert_eq!(Config::load(&out.run_dir.join("config.toml"), &[]).unwrap(), cfg);
    // The clip search ran at the validation; its winner is stored with the weights.
    let clip = lines.iter().rev().find(|l| l["clip_beta"].is_f64()).expect("a clip search result");
    let weights = tch::Tensor::read_safetensors(out.run_dir.join("model.safetensors")).unwrap();
    let buffer = |name: &str| weights.iter().find(|(n, _)| n == name).unwrap().1.double_value(&[]);
    assert!((buffer("sampling_eps_min") - clip["clip_beta"].as_f64().unwrap()).abs() < 1e-6);
    assert!((buffer("sampling_eps_max") - clip["clip_omega"].as_f64().unwrap()).abs() < 1e-6);
    std::fs::remove_dir_all(cfg.run.dir).unwrap();
}

#[test]
fn same_seed_gives_identical_losses() {
    let extra = ["train.steps=20", "model.layers=2", "train.micro_batch=4", "model.dropout=0.1"];
    let a = trainer::train::run(&quick_config("det-a", &extra)).unwrap();
    let b = trainer::train::run(&quick_config("det-b", &extra)).unwrap();
    assert_eq!(a.losses.len(), 20);
    assert_eq!(a.losses, b.losses, "bitwise identical losses");
    assert_eq!(a.final_valid_nelbo, b.final_valid_nelbo);
    let c = trainer::train::run(&quick_config("det-c", &[&extra[..], &["train.seed=2"]].concat())).unwrap();
    assert_ne!(a.losses, c.losses, "another seed gives another run");
    for dir in [a.run_dir, b.run_dir, c.run_dir] {
        std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
    }
}
