//! A run directory is enough to sample from its weights: the run records what it took from its
//! data set (BOS/EOS ids, the tokenizer), so the data set may move away. Weights holding a value
//! that is not finite are refused when loaded, naming the tensor.

use std::path::Path;
use std::process::{Command, Output};

use tch::Tensor;
use test_support::{assert_refused, bd3_binary, repo_root, scratch_dir, tiny_command};

fn ok(out: Output) -> String {
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "bd3 failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    stdout.into_owned()
}

/// `bd3 sample` of `run`'s config with `weights`, run from `cwd`.
fn sample(cwd: &Path, run: &Path, weights: &Path) -> (Output, Vec<String>) {
    let mut cmd = Command::new(bd3_binary());
    cmd.current_dir(cwd).arg("sample").arg("--config").arg(run.join("config.toml"));
    cmd.arg("--weights").arg(weights).args(["--tokens", "16", "--format", "jsonl"]);
    let args = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
    (cmd.output().expect("running bd3 sample"), args)
}

#[test]
fn a_run_samples_after_its_data_set_moved_and_refuses_weights_that_are_not_finite() {
    let scratch = scratch_dir("run-records");
    let dir = scratch.path();
    let data = dir.join("data");
    let corpus = repo_root().join("data/shakespeare");
    let prepare = Command::new(bd3_binary())
        .args(["prepare", "--input"])
        .arg(&corpus)
        .arg("--output")
        .arg(&data)
        .args(["--seq-len", "64", "--valid-documents", "2"])
        .output()
        .unwrap();
    ok(prepare);
    let dataset = format!("data.dataset={:?}", data.display().to_string());
    ok(tiny_command("train", dir, "run", &["train.steps=2", &dataset]).output().unwrap());
    let run = dir.join("run");
    let recorded = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(recorded.contains("bos_id = 50256") && recorded.contains("tokenizer = \"gpt2\""), "{recorded}");

    // The data set moves away; sampling, from another directory than the repository, still works.
    std::fs::rename(&data, dir.join("moved")).unwrap();
    let (out, _) = sample(dir, &run, &run.join("model.safetensors"));
    let stdout = ok(out);
    let first: serde_json::Value = serde_json::from_str(stdout.lines().next().expect("a sample")).unwrap();
    assert_eq!(first["tokens"][0], 50256, "the recorded BOS starts the sample: {first}");
    assert!(first["text"].as_str().unwrap().starts_with("<|endoftext|>"), "decoded with GPT-2: {first}");

    // One NaN in one tensor: refused when loaded, naming the file and the tensor.
    let mut weights = Tensor::read_safetensors(run.join("model.safetensors")).unwrap();
    let (name, tensor) = weights.iter_mut().find(|(n, _)| n.ends_with("attn_qkv.weight")).expect("a qkv weight");
    let _ = tensor.view([-1]).get(7).fill_(f64::NAN);
    let name = name.clone();
    let bad = dir.join("nan.safetensors");
    Tensor::write_safetensors(&weights, &bad).unwrap();
    let (out, args) = sample(dir, &run, &bad);
    assert_refused(&out, &args, &["nan.safetensors", &format!("tensor `{name}`"), "not finite", "flat index 7"]);
}
