//! What a user watches and tries first, through the `bd3` binary (built by `make test`): the
//! Prometheus endpoint of a training run (one per rank), `bd3 report`, weights without the clip
//! buffers, and sampling from a vocabulary that is not GPT-2's.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use test_support::{bd3_binary, repo_root, scratch_dir, tiny_command};

fn run(mut cmd: Command) -> (Output, String) {
    let out = cmd.output().expect("running bd3");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr)
}

/// A port on 127.0.0.1 such that it and the next `count - 1` are free now.
fn free_ports(count: u16) -> u16 {
    loop {
        let base = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if base < 65000 && (0..count).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
}

/// One `GET /metrics`, parsed: (metric name, value of its `rank` label) → value. `None` while
/// nothing listens yet.
fn scrape(port: u16) -> Option<BTreeMap<(String, String), f64>> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "the Prometheus text format: {head}");
    Some(parse_exposition(body))
}

/// The Prometheus text exposition format: `# HELP`/`# TYPE` comments, then `name{labels} value`.
fn parse_exposition(body: &str) -> BTreeMap<(String, String), f64> {
    let mut samples = BTreeMap::new();
    for line in body.lines().filter(|l| !l.is_empty()) {
        if let Some(comment) = line.strip_prefix("# ") {
            let kind = comment.split_whitespace().next().unwrap();
            assert!(kind == "HELP" || kind == "TYPE", "{line}");
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("not a number: {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels.strip_suffix('}').unwrap_or_else(|| panic!("{line}"))),
            None => (series, ""),
        };
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "metric name {name:?}");
        let rank = labels
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "rank")
            .map(|(_, v)| v.trim_matches('"').to_string())
            .unwrap_or_default();
        samples.insert((name.to_string(), rank), value);
    }
    samples
}

/// Scrapes `port` until `bd3_step` (of `rank`) reaches `step`, or fails after two minutes.
fn scrape_at_step(port: u16, rank: &str, step: f64, job: &mut Child) -> BTreeMap<(String, String), f64> {
    let started = Instant::now();
    loop {
        if let Some(metrics) = scrape(port) {
            if metrics.get(&("bd3_step".into(), rank.into())).is_some_and(|&s| s >= step) {
                return metrics;
            }
        }
        assert!(job.try_wait().unwrap().is_none(), "the run ended before step {step} was scraped");
        assert!(started.elapsed() < Duration::from_secs(120), "no step {step} on port {port} after two minutes");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn stop(mut job: Child) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(job.id() as i32, libc::SIGTERM) };
    let _ = job.wait();
}

#[test]
fn a_training_run_serves_its_metrics_to_prometheus() {
    let scratch = scratch_dir("prometheus");
    let port = free_ports(1);
    let listen = format!("metrics.listen=\"127.0.0.1:{port}\"");
    let set = ["train.steps=100000", "train.eval_every=3", "train.eval_batches=1", "checkpoint.every=2", &listen];
    let mut job = tiny_command("train", scratch.path(), "watched", &set).stderr(Stdio::null()).spawn().unwrap();
    let first = scrape_at_step(port, "0", 4.0, &mut job);
    let later = scrape_at_step(port, "0", first[&("bd3_step".into(), "0".into())] + 2.0, &mut job);
    stop(job);

    let get = |m: &BTreeMap<(String, String), f64>, name: &str| {
        *m.get(&(name.to_string(), "0".to_string())).unwrap_or_else(|| panic!("no {name} in {m:?}"))
    };
    assert!(get(&later, "bd3_step") > get(&first, "bd3_step"), "the step increases");
    assert!(get(&later, "bd3_tokens_total") > get(&first, "bd3_tokens_total"));
    let loss = get(&later, "bd3_loss");
    assert!(loss.is_finite() && loss > 0.0 && loss < 20.0, "loss {loss}");
    assert!(get(&later, "bd3_learning_rate") > 0.0);
    assert!(get(&later, "bd3_grad_norm").is_finite());
    assert!(get(&later, "bd3_tokens_per_second") > 0.0);
    assert!(get(&later, "bd3_step_seconds") > 0.0);
    assert!(get(&later, "bd3_data_wait_seconds") >= 0.0);
    assert!(get(&later, "bd3_allreduce_seconds") >= 0.0);
    assert!(get(&later, "bd3_model_flops_per_second") > 0.0);
    assert_eq!(get(&later, "bd3_mfu"), 0.0, "no peak is known for the CPU");
    assert!(get(&later, "bd3_resident_memory_bytes") > 50e6, "libtorch alone is larger");
    assert!(get(&later, "bd3_checkpoint_bytes") > 0.0 && get(&later, "bd3_checkpoint_step") >= 2.0);
    assert!(get(&later, "bd3_checkpoint_write_seconds") > 0.0);
    let nelbo = get(&later, "bd3_valid_nelbo");
    assert!(nelbo > 0.0 && nelbo < 20.0, "validation ran at step 3: {nelbo}");
    let (beta, omega) = (get(&later, "bd3_clip_beta"), get(&later, "bd3_clip_omega"));
    assert!(0.0 < beta && beta <= omega && omega <= 1.0, "[{beta}, {omega}]");
}

#[test]
fn two_ranks_serve_two_ports_and_a_port_in_use_is_named() {
    let scratch = scratch_dir("prometheus-ranks");
    let port = free_ports(2);
    let listen = format!("metrics.listen=\"127.0.0.1:{port}\"");
    let inner = tiny_command("train", scratch.path(), "ranks", &["train.steps=100000", &listen]);
    let mut job = Command::new(bd3_binary());
    job.current_dir(repo_root()).args(["launch", "local", "--nproc", "2"]).args(inner.get_args());
    let mut job = job.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let rank0 = scrape_at_step(port, "0", 2.0, &mut job);
    let rank1 = scrape_at_step(port + 1, "1", 2.0, &mut job);
    // SIGTERM to `bd3 launch local` reaches the ranks through mpirun: none is left behind.
    stop(job);
    let left = Command::new("pgrep").args(["-f", &scratch.path().display().to_string()]).output().unwrap();
    assert!(left.stdout.is_empty(), "ranks still running: {}", String::from_utf8_lossy(&left.stdout));
    assert!(rank0.keys().all(|(_, rank)| rank == "0"), "port {port} is rank 0's");
    assert!(rank1.keys().all(|(_, rank)| rank == "1"), "port {} is rank 1's", port + 1);
    assert!(rank1[&("bd3_loss".into(), "1".into())].is_finite());

    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let listen = format!("metrics.listen=\"{addr}\"");
    let (out, stderr) = run(tiny_command("train", scratch.path(), "taken", &["train.steps=2", &listen]));
    assert_eq!(out.status.code(), Some(1), "a clear error, not a panic:\n{stderr}");
    assert!(stderr.contains(&addr.to_string()) && stderr.contains("metrics.listen"), "{stderr}");
}

/// Width and height of a PNG file (its IHDR chunk), after checking the signature.
fn png_size(file: &Path) -> (u32, u32) {
    let bytes = std::fs::read(file).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{} is not a PNG", file.display());
    assert_eq!(&bytes[12..16], b"IHDR");
    let be = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap());
    (be(&bytes[16..20]), be(&bytes[20..24]))
}

#[test]
fn report_charts_and_compares_two_runs() {
    let scratch = scratch_dir("report");
    let dir = scratch.path();
    for (name, lr) in [("fast", "optim.lr=3e-3"), ("slow", "optim.lr=1e-3")] {
        let set = ["train.steps=6", "train.eval_every=3", "train.eval_batches=1", lr];
        let mut cmd = tiny_command("train", dir, name, &set);
        if name == "fast" {
            cmd.args(["--log-format", "json"]);
        }
        let (out, stderr) = run(cmd);
        assert!(out.status.success(), "{stderr}");
        if name == "fast" {
            for line in stderr.lines().filter(|l| !l.is_empty()) {
                let event: serde_json::Value =
                    serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}"));
                assert!(event["level"].is_string() && event["fields"].is_object(), "{line}");
            }
        }
        // The run stamp.
        let stamp: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(name).join("run.json")).unwrap()).unwrap();
        assert_eq!((stamp["run"].as_str(), stamp["world_size"].as_u64()), (Some(name), Some(1)));
        assert_eq!(stamp["hostnames"].as_array().unwrap().len(), 1);
        assert_eq!(stamp["config_hash"].as_str().unwrap().len(), 16);
        assert!(!stamp["git_commit"].as_str().unwrap().is_empty() && stamp["libtorch"] == "2.11.0");
    }
    let out_dir = dir.join("compare");
    let mut cmd = Command::new(bd3_binary());
    cmd.args(["report", dir.join("fast").to_str().unwrap(), dir.join("slow").to_str().unwrap(), "--out"]).arg(&out_dir);
    let (out, stderr) = run(cmd);
    assert!(out.status.success(), "{stderr}");

    for chart in ["loss", "valid_nelbo", "lr", "grad_norm", "tokens_per_s", "model_flops_per_s"] {
        for axis in ["step", "tokens"] {
            let file = out_dir.join(format!("{chart}-by-{axis}.png"));
            assert_eq!(png_size(&file), (900, 540), "{}", file.display());
            assert!(std::fs::metadata(&file).unwrap().len() > 5_000, "{} has lines and text", file.display());
        }
    }
    assert!(!out_dir.join("mfu-by-step.png").exists(), "no MFU chart without a known peak");
    let md = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    for name in ["fast", "slow"] {
        let last_loss = std::fs::read_to_string(dir.join(name).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64())
            .unwrap();
        let row = md.lines().find(|l| l.starts_with(&format!("| {name} | 6 |"))).unwrap_or_else(|| panic!("{md}"));
        assert!(row.contains(&format!("{last_loss:.4}")), "final loss {last_loss:.4} of {name} in {row}");
    }
    assert!(md.contains("| `optim.lr` | `0.003` | `0.001` |"), "the config difference:\n{md}");
    let hash = |name: &str| {
        let stamp: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(name).join("run.json")).unwrap()).unwrap();
        stamp["config_hash"].as_str().unwrap().to_string()
    };
    assert!(md.contains(&hash("fast")) && md.contains(&hash("slow")), "provenance from run.json:\n{md}");
    assert!(!md.contains("`model.hidden`"), "only differing keys are listed:\n{md}");
    assert!(md.contains("](loss-by-tokens.png)"), "{md}");
}

/// Random weights of the tiny test model (with `sets`) in a safetensors file, without the
/// tensors named in `drop`.
fn weights_file(dir: &Path, file: &str, sets: &[&str], drop: &[&str]) -> String {
    let mut overrides = vec!["model.layers=2".to_string(), "model.seq_len=64".to_string()];
    overrides.extend(sets.iter().map(|s| s.to_string()));
    let cfg = trainer::Config::load(&repo_root().join("configs/tiny.toml"), &overrides).unwrap();
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    trainer::Dit::new(&vs.root(), &cfg.model).unwrap();
    let kept: Vec<(String, tch::Tensor)> =
        vs.variables().into_iter().filter(|(k, _)| !drop.contains(&k.as_str())).collect();
    let path = dir.join(file);
    tch::Tensor::write_safetensors(&kept, &path).unwrap();
    path.display().to_string()
}

#[test]
fn backbone_only_weights_import_and_sample() {
    let scratch = scratch_dir("backbone");
    let dir = scratch.path();
    let buffers = ["sampling_eps_min", "sampling_eps_max", "backbone.rotary_emb.inv_freq"];
    let file = weights_file(dir, "backbone.safetensors", &[], &buffers);
    let ckpts = dir.join("imported");
    let mut cmd = Command::new(bd3_binary());
    cmd.current_dir(repo_root()).args([
        "ckpt",
        "import",
        &file,
        ckpts.to_str().unwrap(),
        "--config",
        "configs/tiny.toml",
    ]);
    for set in
        ["model.layers=2", "model.seq_len=64", "diffusion.sampling_eps_min=0.25", "diffusion.sampling_eps_max=0.75"]
    {
        cmd.args(["--set", set]);
    }
    let (out, stderr) = run(cmd);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("lack this buffer") && stderr.contains("sampling_eps_min"), "a warning says so: {stderr}");

    let store = checkpoint::CheckpointStore::open(ckpts.to_str().unwrap()).unwrap();
    let manifest = store.manifest(0).unwrap();
    for (name, expected) in [("model.sampling_eps_min", 0.25f32), ("ema.sampling_eps_max", 0.75)] {
        let buffer = store.read(&manifest, name, &checkpoint::Slice::whole(&[])).unwrap();
        assert_eq!(f32::from_le_bytes(buffer.data[..4].try_into().unwrap()), expected, "{name}");
    }
    assert!(manifest.tensors.contains_key("model.backbone.rotary_emb.inv_freq"), "recomputed and stored");

    let mut sample = tiny_command("sample", dir, "backbone", &[]);
    sample.args(["--weights", &file, "--tokens", "8"]);
    let (out, stderr) = run(sample);
    assert!(out.status.success(), "{stderr}");
}

#[test]
fn a_small_vocabulary_samples_with_its_own_ids() {
    let scratch = scratch_dir("small-vocab");
    let dir = scratch.path();
    let vocab = ["model.vocab_size=1000", "diffusion.mask_id=999"];
    let file = weights_file(dir, "vocab1000.safetensors", &vocab, &[]);
    let sample = |extra: &[&str]| {
        let sets: Vec<&str> = vocab.iter().chain(extra).copied().collect();
        let mut cmd = tiny_command("sample", dir, "v", &sets);
        cmd.args(["--weights", &file, "--tokens", "40", "--format", "jsonl"]);
        run(cmd)
    };

    let (out, stderr) = sample(&["data.bos_id=5", "data.eos_id=6"]);
    assert!(out.status.success(), "{stderr}");
    let line: serde_json::Value = serde_json::from_slice(out.stdout.split(|&b| b == b'\n').next().unwrap()).unwrap();
    let tokens: Vec<u64> = line["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
    assert_eq!(tokens[0], 5, "every sequence starts with the configured BOS");
    assert!(tokens.iter().all(|&t| t < 1000), "{tokens:?}");

    // GPT-2's BOS (the default) does not fit: a clear error naming it and the field to set.
    let (out, stderr) = sample(&[]);
    assert_eq!(out.status.code(), Some(1), "a clear error, not a panic:\n{stderr}");
    assert!(stderr.contains("BOS id 50256") && stderr.contains("data.bos_id"), "{stderr}");

    let (out, stderr) = sample(&["data.bos_id=1000", "data.eos_id=6"]);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("data.bos_id (1000) must be below model.vocab_size (1000)"), "{stderr}");

    // Without data.bos_id the data set's index.json names the ids: GPT-2's again, refused
    // naming the data set.
    let data = dir.join("data");
    let mut prepare = Command::new(bd3_binary());
    prepare.current_dir(repo_root()).args(["prepare", "--input", "data/shakespeare", "--seq-len", "64", "--output"]);
    prepare.arg(&data);
    let (out, stderr) = run(prepare);
    assert!(out.status.success(), "{stderr}");
    let dataset = format!("data.dataset={:?}", data.display().to_string());
    let (out, stderr) = sample(&[&dataset]);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("index.json") && stderr.contains("BOS id 50256"), "{stderr}");
}
