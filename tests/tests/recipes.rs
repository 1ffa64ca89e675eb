//! The paper's recipes in configs/ (docs/algorithm.md §8): every one loads and validates through
//! `bd3 train --dry-run`, `bd3 plan` projects its cost, and the numbers are the paper's.

use std::path::PathBuf;
use std::process::Command;

use test_support::{bd3_binary, repo_root};
use trainer::config::Arch;
use trainer::Config;

/// Every `configs/*.toml`, sorted.
fn configs() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_root().join("configs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

fn bd3(args: &[&str]) -> (String, String) {
    let out = Command::new(bd3_binary()).current_dir(repo_root()).args(args).output().expect("running bd3");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "bd3 {args:?} failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    (stdout.into_owned(), stderr.into_owned())
}

fn load(name: &str) -> Config {
    Config::load(&repo_root().join("configs").join(name), &[]).unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

#[test]
fn every_config_dry_runs_and_plans() {
    let files = configs();
    assert!(files.len() >= 15, "{files:?}");
    for file in &files {
        let path = file.strip_prefix(repo_root()).unwrap().display().to_string();
        let cfg = Config::load(file, &[]).unwrap();
        let run_dir = repo_root().join(cfg.run_dir());
        let existed = run_dir.exists();
        let (stdout, _) = bd3(&["train", "--config", &path, "--dry-run"]);
        assert!(stdout.contains("config valid; dry run, nothing trained"), "{path}:\n{stdout}");
        assert!(existed || !run_dir.exists(), "{path}: the dry run created {}", run_dir.display());
        assert!(stdout.contains(&cfg.run_dir().display().to_string()), "{path}:\n{stdout}");
        assert!(stdout.contains(&format!("{} steps", cfg.train.steps)), "{path}:\n{stdout}");

        let (stdout, _) = bd3(&["plan", "--config", &path, "--gpu", "H100", "--gpus-per-node", "8"]);
        assert!(stdout.contains("GPU-hours"), "{path}: bd3 plan printed no cost:\n{stdout}");
        let (json, _) = bd3(&["plan", "--config", &path, "--json"]);
        let plan: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert!(plan.is_object(), "{path}: {json}");
    }
}

#[test]
fn dry_run_names_what_the_run_starts_from_and_refuses_bad_configs() {
    let (stdout, _) = bd3(&["train", "--config", "configs/owt-bd3-4.toml", "--dry-run"]);
    assert!(stdout.contains("from the weights of runs/owt-stage1/checkpoints"), "{stdout}");
    assert!(stdout.contains("block size L' = 4"), "{stdout}");
    let (stdout, _) = bd3(&[
        "train",
        "--config",
        "configs/owt-bd3-4.toml",
        "--init-from",
        "elsewhere/model.safetensors",
        "--dry-run",
    ]);
    assert!(stdout.contains("from the weights of elsewhere/model.safetensors"), "{stdout}");
    let (stdout, _) = bd3(&["train", "--config", "configs/owt-stage1.toml", "--dry-run"]);
    assert!(stdout.contains("MDLM (block size L' = L = 1024)") && stdout.contains("169627218 parameters"), "{stdout}");

    // A scheduled job runs with the same starting point: --init-from travels as a --set.
    let (script, _) = bd3(&[
        "launch",
        "slurm",
        "--dry-run",
        "--nodes",
        "1",
        "--gpus-per-node",
        "8",
        "--",
        "train",
        "--config",
        "configs/owt-bd3-4.toml",
        "--init-from",
        "elsewhere/model.safetensors",
    ]);
    assert!(script.contains(r#"--set 'train.init_from="elsewhere/model.safetensors"'"#), "{script}");

    let args = ["train", "--config", "configs/owt-stage1.toml", "--set", "diffusion.block_size=3", "--dry-run"];
    let out = Command::new(bd3_binary()).current_dir(repo_root()).args(args).output().unwrap();
    test_support::assert_refused(&out, &args, &["diffusion.block_size"]);
}

/// The numbers of docs/algorithm.md §1.1, §1.2, §7 and §8.
#[test]
fn recipes_hold_the_papers_numbers() {
    for name in [
        "owt-stage1.toml",
        "owt-bd3-4.toml",
        "owt-bd3-8.toml",
        "owt-bd3-16.toml",
        "owt-ar.toml",
        "owt-mdlm.toml",
        "lm1b-stage1.toml",
        "lm1b-bd3-4.toml",
        "lm1b-bd3-8.toml",
        "lm1b-bd3-16.toml",
        "lm1b-ar.toml",
        "lm1b-mdlm.toml",
        "lm1b-mdlm-unpacked.toml",
    ] {
        let c = load(name);
        let (m, o, t) = (&c.model, &c.optim, &c.train);
        assert_eq!((m.hidden, m.layers, m.heads, m.cond_dim, m.dropout), (768, 12, 12, 128, 0.1), "{name}");
        assert_eq!((o.lr, o.warmup_steps, o.ema_decay, o.grad_clip, o.weight_decay), (3e-4, 2500, 0.9999, 1.0, 0.0));
        assert_eq!((o.beta1, o.beta2, t.seed), (0.9, 0.999, 1), "{name}");
        // Global batch 512 on the one node of 8 GPUs the files are written for.
        assert_eq!(t.micro_batch * t.grad_accum * 8, 512, "{name}");
        assert_eq!(c.run.name, name.trim_end_matches(".toml"), "{name}");
        let stage2 = name.contains("-bd3-");
        let steps = if stage2 {
            150_000
        } else if name.contains("stage1") {
            850_000
        } else {
            1_000_000
        };
        assert_eq!(t.steps, steps, "{name}");
        let block = if stage2 {
            name.trim_end_matches(".toml").rsplit('-').next().unwrap().parse().unwrap()
        } else {
            m.seq_len
        };
        if m.arch == Arch::Bd3 {
            assert_eq!(c.diffusion.block_size, block, "{name}");
            // The clip search (with resampling) is stage 2's; stage 1 and MDLM train on [1e-3, 1].
            assert_eq!(c.diffusion.clip_search, stage2, "{name}");
        } else {
            assert!(name.ends_with("-ar.toml"));
        }
        if name.starts_with("owt") {
            assert_eq!((m.seq_len, m.vocab_size, c.diffusion.mask_id), (1024, 50258, 50257), "{name}");
            assert!(c.data.dataset.starts_with("data/owt-1024"), "{name}");
        } else {
            assert_eq!((m.seq_len, m.vocab_size, c.diffusion.mask_id), (128, 30522, 103), "{name}");
            assert!(c.data.dataset.starts_with("data/lm1b-128"), "{name}");
        }
        let stage1 =
            if name.starts_with("owt") { "runs/owt-stage1/checkpoints" } else { "runs/lm1b-stage1/checkpoints" };
        assert_eq!(t.init_from.as_deref(), stage2.then_some(stage1), "{name}");
    }
    assert_eq!(load("owt-ar.toml").model.arch, Arch::Ar);
    assert_eq!(load("lm1b-ar.toml").model.arch, Arch::Ar);
}
