//! `bd3 train --init-from`: the paper's second stage starts from the first stage's weights with a
//! fresh optimizer, EMA, step, data order and clip interval (docs/algorithm.md §8); other shapes
//! and missing tensors are refused by name; a checkpoint of the run itself wins over init-from.

use std::path::Path;
use std::process::Output;

use checkpoint::{CheckpointStore, Manifest, Slice};
use test_support::{assert_refused, scratch_dir, tiny_command};

fn ok(out: Output) -> String {
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "bd3 failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    stderr.into_owned()
}

/// Stage 1: L′ = L = 64 (MDLM), 3 steps, a checkpoint at the end.
fn stage_one(dir: &Path) -> std::path::PathBuf {
    let out = tiny_command("train", dir, "stage1", &["train.steps=3", "diffusion.block_size=64"]).output().unwrap();
    ok(out);
    dir.join("stage1")
}

/// The newest committed checkpoint of `run`.
fn latest(run: &Path) -> (CheckpointStore, Manifest) {
    let store = CheckpointStore::open(run.join("checkpoints").to_str().unwrap()).unwrap();
    let manifest = store.latest_valid().unwrap().manifest.expect("a committed checkpoint");
    (store, manifest)
}

/// A tensor of a checkpoint as f32 values.
fn values(store: &CheckpointStore, manifest: &Manifest, name: &str) -> Vec<f32> {
    let shape = &manifest.tensors.get(name).unwrap_or_else(|| panic!("no tensor {name}")).shape;
    let buffer = store.read(manifest, name, &Slice::whole(shape)).unwrap();
    buffer.data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

fn progress(manifest: &Manifest) -> serde_json::Value {
    manifest.meta.state["progress"].clone()
}

#[test]
fn stage_two_starts_from_stage_one_weights_and_a_checkpoint_of_its_own_wins() {
    let scratch = scratch_dir("init-from");
    let dir = scratch.path();
    let stage1 = stage_one(dir);
    let (store1, manifest1) = latest(&stage1);
    assert_eq!(manifest1.step, 3);

    // Stage 2 at L′ = 4 for one step, with a learning rate so small that the weights do not
    // move: the EMA after its first update is then the loaded weights themselves. Its clip
    // interval is the config's; the clip search is off so that the end-of-run validation keeps it.
    let source = stage1.join("checkpoints").display().to_string();
    let stage2_sets = [
        "train.steps=1",
        "diffusion.block_size=4",
        "optim.lr=1e-30",
        "diffusion.clip_search=false",
        "diffusion.sampling_eps_min=0.3",
        "diffusion.sampling_eps_max=0.8",
    ];
    let out = tiny_command("train", dir, "stage2", &stage2_sets).args(["--init-from", &source]).output().unwrap();
    let log = ok(out);
    assert!(log.contains("initialized the weights"), "{log}");
    let stage2 = dir.join("stage2");
    let (store2, manifest2) = latest(&stage2);
    assert_eq!(manifest2.step, 1, "step 0 + one step, not stage 1's 3 + 1");
    let p = progress(&manifest2);
    assert_eq!(
        (p["step"].as_u64(), p["optimizer_steps"].as_u64(), p["ema_updates"].as_u64()),
        (Some(1), Some(1), Some(1))
    );
    // Fresh data order: one global batch of 4 sequences consumed in epoch 0.
    assert_eq!((p["data"]["epoch"].as_u64(), p["data"]["consumed"].as_u64()), (Some(0), Some(4)), "{p}");
    // The clip interval is the config's, in the progress and in the weights' buffers.
    assert_eq!((p["clip_beta"].as_f64(), p["clip_omega"].as_f64()), (Some(0.3), Some(0.8)));
    // 0.3 rounded to fp32: within 0.3 · 2⁻²⁴ ≈ 1.8e-8.
    assert!((values(&store2, &manifest2, "model.sampling_eps_min")[0] - 0.3).abs() < 2e-8);

    let mut compared = 0;
    for name in manifest1.tensors.keys().filter_map(|n| n.strip_prefix("ema.")) {
        // EMA (and weights) equal to stage 1's EMA weights.
        let loaded = values(&store1, &manifest1, &format!("ema.{name}"));
        for prefix in ["ema", "model"] {
            let now = values(&store2, &manifest2, &format!("{prefix}.{name}"));
            assert_eq!(now.len(), loaded.len());
            let worst = now.iter().zip(&loaded).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            // AdamW's first step moves a weight by lr = 1e-30 at most (m̂/√v̂ = ±1), which the
            // EMA follows by less: within 1e-29, if not the same bits.
            assert!(worst <= 1e-29, "{prefix}.{name} differs from stage 1's EMA weights by {worst}");
        }
        // Fresh moments: after one AdamW step from zero, m = (1 − β1)·g and v = (1 − β2)·g², so
        // v = 0.1·m² for β = (0.9, 0.999); moments carried over from stage 1 would not satisfy it.
        let m = values(&store2, &manifest2, &format!("optim.exp_avg.{name}"));
        let v = values(&store2, &manifest2, &format!("optim.exp_avg_sq.{name}"));
        for (m, v) in m.iter().zip(&v) {
            let expected = 0.1 * m * m;
            // A handful of fp32 roundings (2⁻²⁴ ≈ 6e-8 relative each) on both sides: 1e-5
            // relative, plus an absolute 1e-30 for squares that fall into fp32's subnormals.
            assert!((v - expected).abs() <= 1e-5 * expected.abs() + 1e-30, "{name}: v {v}, 0.1·m² {expected}");
        }
        compared += 1;
    }
    assert!(compared > 10, "compared {compared} tensors");
    // Stage 2's metrics start at step 1.
    let metrics = std::fs::read_to_string(stage2.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert_eq!(first["step"], 1);

    // Preempted and relaunched with the same command plus --resume auto: its own checkpoint wins.
    let mut sets = stage2_sets.to_vec();
    sets[0] = "train.steps=2";
    let out = tiny_command("train", dir, "stage2", &sets)
        .args(["--init-from", &source, "--resume", "auto"])
        .output()
        .unwrap();
    let log = ok(out);
    assert!(log.contains("resuming it, train.init_from is not used"), "{log}");
    assert!(!log.contains("initialized the weights"), "{log}");
    let (_, manifest) = latest(&stage2);
    let p = progress(&manifest);
    assert_eq!((manifest.step, p["optimizer_steps"].as_u64(), p["ema_updates"].as_u64()), (2, Some(2), Some(2)));
}

#[test]
fn init_from_refuses_other_shapes_missing_tensors_and_missing_sources() {
    let scratch = scratch_dir("init-from-refusals");
    let dir = scratch.path();
    let stage1 = stage_one(dir);
    let checkpoints = stage1.join("checkpoints").display().to_string();
    let weights = stage1.join("model.safetensors").display().to_string();

    // Another hidden size: refused naming a tensor and both shapes, from a checkpoint and from
    // a weights file; nothing is trained or written.
    let other = ["train.steps=1", "model.hidden=64", "model.heads=2"];
    for source in [&checkpoints, &weights] {
        let args = ["--init-from", source.as_str()];
        let out = tiny_command("train", dir, "wider", &other).args(args).output().unwrap();
        assert_refused(&out, &args, &["tensor `backbone.", "has shape", "needs"]);
        assert!(!dir.join("wider/model.safetensors").exists(), "nothing trained");
    }
    let args = ["--init-from", checkpoints.as_str()];
    let out = tiny_command("train", dir, "wider", &other).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("this config's model needs"), "{stderr}");

    // A weights file without one of the model's tensors: refused naming it.
    let tensors = tch::Tensor::read_safetensors(&weights).unwrap();
    let dropped = "backbone.blocks.1.attn_out.weight";
    let kept: Vec<(String, tch::Tensor)> = tensors.into_iter().filter(|(n, _)| n != dropped).collect();
    let partial = dir.join("partial.safetensors");
    tch::Tensor::write_safetensors(&kept, &partial).unwrap();
    let args = ["--init-from", partial.to_str().unwrap()];
    let out = tiny_command("train", dir, "partial", &["train.steps=1"]).args(args).output().unwrap();
    assert_refused(&out, &args, &[dropped, "partial.safetensors"]);

    // Nothing at the path.
    let missing = dir.join("nowhere").display().to_string();
    let args = ["--init-from", missing.as_str()];
    let out = tiny_command("train", dir, "nowhere", &["train.steps=1"]).args(args).output().unwrap();
    assert_refused(&out, &args, &["train.init_from", "nowhere"]);

    // A weights file in an object store is refused: only checkpoint locations are read by URL.
    let args = ["--init-from", "s3://bucket/model.safetensors"];
    let out = tiny_command("train", dir, "remote", &["train.steps=1"]).args(args).output().unwrap();
    assert_refused(&out, &args, &["must be a local path"]);

    // The config key does the same as the flag (what launchers pass with --set).
    let set = format!("train.init_from={weights:?}");
    let out =
        tiny_command("train", dir, "by-key", &["train.steps=1", "diffusion.block_size=4", &set]).output().unwrap();
    let log = ok(out);
    assert!(log.contains("initialized the weights") && log.contains("model.safetensors"), "{log}");
}
