//! Faults and bad input through the `bd3` binary (built by `make test`): divergence never reaches
//! a committed checkpoint, bad values and bad weights are refused with the field, file or tensor
//! named, and a run stopped by SIGTERM resumes bit for bit.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use test_support::{repo_root, scratch_dir, tiny_command};

/// The shared tiny command of the test support.
fn tiny(command: &str, run_dir: &Path, name: &str, extra: &[&str]) -> Command {
    tiny_command(command, run_dir, name, extra)
}

fn run(mut cmd: Command) -> (Output, String) {
    let out = cmd.output().expect("running bd3");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr)
}

/// Every tensor of every committed checkpoint under `ckpts`: the committed steps and whether
/// all their values are finite.
fn committed_steps_all_finite(ckpts: &Path) -> Vec<(u64, bool)> {
    let store = checkpoint::CheckpointStore::open(ckpts.to_str().unwrap()).unwrap();
    let mut out = vec![];
    for step in store.committed_steps().unwrap() {
        let dir = ckpts.join(format!("step-{step:010}"));
        let mut finite = true;
        for file in std::fs::read_dir(&dir).unwrap().flatten() {
            if file.path().extension().is_some_and(|e| e == "safetensors") {
                for (_, t) in tch::Tensor::read_safetensors(file.path()).unwrap() {
                    let t = t.to_kind(tch::Kind::Double);
                    finite &= t.isfinite().all().int64_value(&[]) == 1;
                }
            }
        }
        out.push((step, finite));
    }
    out
}

#[test]
fn a_diverging_run_never_commits_a_non_finite_checkpoint() {
    let scratch = scratch_dir("nan");
    let dir = scratch.path();
    let diverge = ["optim.lr=1e38", "optim.warmup_steps=0", "checkpoint.every=1", "train.steps=8"];

    // Stop (the default): the run fails naming the step, and what was committed is finite.
    let (out, stderr) = run(tiny("train", dir, "stop", &diverge));
    assert!(!out.status.success(), "the diverging run succeeded:\n{stderr}");
    assert!(stderr.contains("step ") && stderr.contains("non-finite") || stderr.contains("is NaN"), "{stderr}");
    let stop = committed_steps_all_finite(&dir.join("stop/checkpoints"));
    assert!(stop.iter().all(|(_, finite)| *finite), "a committed checkpoint holds NaN/Inf: {stop:?}");

    // Skip: the update of step 1 itself overflows (finite gradients, absurd rate); steps with a
    // non-finite loss are skipped, and the writer refuses the non-finite weights, so again only
    // finite checkpoints are committed.
    let skip = [&diverge[..], &["train.on_nonfinite=\"skip\""]].concat();
    let (out, stderr) = run(tiny("train", dir, "skip", &skip));
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("step skipped") || stderr.contains("non-finite"), "{stderr}");
    let skip = committed_steps_all_finite(&dir.join("skip/checkpoints"));
    assert!(skip.iter().all(|(_, finite)| *finite), "a committed checkpoint holds NaN/Inf: {skip:?}");
}

#[test]
fn skip_mode_skips_diverging_steps_and_goes_on() {
    let scratch = scratch_dir("skip");
    let dir = scratch.path();
    // Losses above the median of a plain run's count as divergence: about half the steps.
    let (out, stderr) = run(tiny("train", dir, "plain", &["train.steps=12"]));
    assert!(out.status.success(), "{stderr}");
    let mut losses: Vec<f64> = metrics(&dir.join("plain")).0.into_iter().map(|(_, l)| l).collect();
    losses.sort_by(f64::total_cmp);
    let max_loss = format!("train.max_loss={}", losses[6]);
    let set = ["train.steps=12", "train.on_nonfinite=\"skip\"", "train.max_consecutive_skips=12", &max_loss];
    let (out, stderr) = run(tiny("train", dir, "skipping", &set));
    assert!(out.status.success(), "{stderr}");
    let skipped = stderr.lines().filter(|l| l.contains("step skipped")).count();
    assert!((1..12).contains(&skipped), "{skipped} of 12 steps skipped:\n{stderr}");
    assert_eq!(metrics(&dir.join("skipping")).0.len(), 12, "every step logged, skipped or not");
}

#[test]
fn a_loss_spike_above_max_loss_stops_the_run() {
    let scratch = scratch_dir("spike");
    let (out, stderr) = run(tiny("train", scratch.path(), "spike", &["train.steps=3", "train.max_loss=1.0"]));
    assert!(!out.status.success());
    assert!(stderr.contains("above train.max_loss (1)") && stderr.contains("step 1"), "{stderr}");
}

#[test]
fn a_vocabulary_smaller_than_the_data_is_refused_before_training() {
    let scratch = scratch_dir("vocab");
    let (out, stderr) =
        run(tiny("train", scratch.path(), "vocab", &["model.vocab_size=1000", "diffusion.mask_id=999"]));
    assert_eq!(out.status.code(), Some(1), "a clear error, not a panic (101):\n{stderr}");
    assert!(stderr.contains("model.vocab_size (1000)") && stderr.contains("50257"), "{stderr}");
}

#[test]
fn weights_load_only_from_matching_safetensors() {
    let scratch = scratch_dir("weights");
    let dir = scratch.path();
    let save = |layers: i64, hidden: i64, file: &str| {
        let cfg = trainer::Config::load(
            &repo_root().join("configs/tiny.toml"),
            &[format!("model.layers={layers}"), format!("model.hidden={hidden}"), "model.seq_len=64".into()],
        )
        .unwrap();
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        trainer::Dit::new(&vs.root(), &cfg.model).unwrap();
        vs.save(dir.join(file)).unwrap(); // a pickle archive unless the name ends in .safetensors
        dir.join(file).display().to_string()
    };
    let sample = |weights: &str| {
        let mut cmd = tiny("sample", dir, "w", &[]);
        cmd.args(["--weights", weights, "--tokens", "8"]);
        run(cmd)
    };

    let pickle = save(2, 128, "weights.pt");
    let (out, stderr) = sample(&pickle);
    assert!(!out.status.success());
    assert!(stderr.contains("weights.pt is not a safetensors file"), "{stderr}");

    let deeper = save(4, 128, "four-layers.safetensors");
    let (out, stderr) = sample(&deeper);
    assert!(!out.status.success());
    assert!(stderr.contains("four-layers.safetensors") && stderr.contains("blocks.2."), "{stderr}");

    let wider = save(2, 64, "narrow.safetensors");
    let (out, stderr) = sample(&wider);
    assert!(!out.status.success());
    let line = stderr.lines().find(|l| l.contains("has shape")).unwrap_or_else(|| panic!("{stderr}"));
    // One line names the file, the tensor and both shapes.
    let (ours, theirs) = line.split_once(", the model needs ").unwrap_or_else(|| panic!("{line}"));
    assert!(ours.contains("narrow.safetensors: tensor `") && ours.contains("` has shape ["), "{line}");
    assert!(theirs.starts_with('[') && ours.rsplit_once("has shape ").unwrap().1 != theirs, "{line}");

    // The matching file samples.
    let good = save(2, 128, "good.safetensors");
    let (out, stderr) = sample(&good);
    assert!(out.status.success(), "{stderr}");
}

/// Step → training loss from a run's metrics log, and its number of lines.
fn metrics(run: &Path) -> (Vec<(u64, f64)>, usize) {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let losses =
        lines.iter().filter(|v| v["loss"].is_f64()).map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()));
    (losses.collect(), lines.len())
}

#[test]
fn a_run_stopped_by_sigterm_resumes_bit_for_bit() {
    let scratch = scratch_dir("sigterm");
    let dir = scratch.path();
    // Validation (with its clip search) only at the end: the stop lands on a step that is not a
    // validation step. Dropout on, so libtorch's generator matters too.
    let set = ["train.steps=40", "model.dropout=0.1", "checkpoint.every=0"];
    let (out, stderr) = run(tiny("train", dir, "straight", &set));
    assert!(out.status.success(), "{stderr}");

    let mut job = tiny("train", dir, "stopped", &set).stderr(Stdio::piped()).spawn().unwrap();
    let mut log = BufReader::new(job.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("step=3 ") {
        line.clear();
        assert!(log.read_line(&mut line).unwrap() > 0, "the run ended before step 3");
    }
    // SAFETY: kill only sends a signal to the process this test started.
    assert_eq!(unsafe { libc::kill(job.id() as i32, libc::SIGTERM) }, 0);
    let rest: Vec<String> = log.lines().map_while(Result::ok).collect();
    assert!(job.wait().unwrap().success(), "{}", rest.join("\n"));
    let stopped_at = metrics(&dir.join("stopped")).0.len();
    assert!(stopped_at < 40, "the signal came too late to test anything: stopped at {stopped_at}");

    let (out, stderr) = run({
        let mut cmd = tiny("train", dir, "stopped", &set);
        cmd.args(["--resume", "auto"]);
        cmd
    });
    assert!(out.status.success(), "{stderr}");
    let (straight, straight_lines) = metrics(&dir.join("straight"));
    let (resumed, resumed_lines) = metrics(&dir.join("stopped"));
    assert_eq!(straight, resumed, "the same loss at every step");
    assert_eq!(straight_lines, resumed_lines, "one metrics line per logged step after the resume");
    let read = |run: &str| std::fs::read(dir.join(run).join("model.safetensors")).unwrap();
    assert!(read("straight") == read("stopped"), "final weights differ after a stop at step {stopped_at}");
}
