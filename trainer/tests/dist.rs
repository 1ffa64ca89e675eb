//! Multi-process tests with real Open MPI: `mpirun` starts the `dist-check` binary (src/bin) on 2
//! or 3 ranks (oversubscribed on small machines) and the test checks what every rank reported.

use std::path::Path;
use std::process::{Command, Output};

use launcher::local::mpirun_command;
use tch::Tensor;
use test_support::{
    data_parallel_tolerance, reordered_sum_bound, repo_root, run_overrides, scratch_dir, ADAMW_EPS, FP64,
};

const CHECK: &str = env!("CARGO_BIN_EXE_dist-check");

fn output(mut cmd: Command) -> (Output, String, String) {
    let out = cmd.output().expect("starting mpirun (installed by scripts/setup.sh)");
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    (out, stdout, stderr)
}

fn mpirun(np: usize, args: &[&str]) -> (Output, String, String) {
    let mut cmd = mpirun_command(np);
    cmd.arg(CHECK).args(args);
    output(cmd)
}

#[test]
fn every_collective_matches_a_serial_reference_on_2_and_3_ranks() {
    for np in [2, 3] {
        let (out, stdout, stderr) = mpirun(np, &["collectives"]);
        assert!(out.status.success(), "{np} ranks: {}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
        for rank in 0..np {
            let line = format!("rank {rank}/{np}: ");
            assert!(
                stdout.lines().any(|l| l.starts_with(&line) && l.ends_with("checks passed")),
                "no report from rank {rank} of {np}:\n{stdout}\n{stderr}"
            );
        }
    }
}

/// The CPU twin of kernels/gpu-check.sh's `nccl_overlap` step: the same `dist-check overlap`,
/// over MPI on 2 ranks instead of NCCL on 1 GPU.
#[test]
fn the_overlap_check_finds_overlapped_gradients_bitwise_equal_on_2_ranks() {
    let (out, stdout, stderr) = mpirun(2, &["overlap", "cpu"]);
    assert!(out.status.success(), "{}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    for rank in 0..2 {
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("rank {rank} OVERLAP ")))
            .unwrap_or_else(|| panic!("no report from rank {rank}:\n{stdout}\n{stderr}"));
        let report: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(report["bitwise_equal"], true, "{report}");
        assert_eq!(report["ordered"], true, "{report}");
        assert_eq!(report["world_size"], 2, "{report}");
        assert_eq!(report["reduction_changed_gradients"], true, "the ranks' inputs differ: {report}");
        // One bucket per 1 MiB weight, the biases sharing them: at least the 8 weights' worth.
        assert!(report["buckets"].as_u64().unwrap() >= 8, "{report}");
    }
}

#[test]
fn a_peer_that_stops_makes_the_others_exit_with_an_error() {
    // The last of 3 ranks never reaches the second barrier; the watchdog of the two others ends
    // them after 2 s, and mpirun then ends the job with a failure.
    let (out, stdout, stderr) = mpirun(3, &["hang", "2"]);
    assert!(!out.status.success(), "the job succeeded:\n{stdout}\n{stderr}");
    assert!(stderr.contains("(barrier) did not complete within 2.0 s"), "{stderr}");
    assert!(!stderr.contains("the barrier completed"), "{stderr}");
}

/// A small data-parallel acceptance config: the tiny model shrunk, no dropout (its masks depend
/// on the batch shape), no clip search (it would run on differently sized validation batches).
fn train_args(run_dir: &Path, name: &str, micro_batch: usize) -> Vec<String> {
    let root = repo_root();
    vec!["train".into(), root.join("configs/tiny.toml").display().to_string()]
        .into_iter()
        .chain(run_overrides(run_dir, name))
        .chain([
            "model.seq_len=64".into(),
            "model.layers=2".into(),
            "model.dropout=0.0".into(),
            "diffusion.clip_search=false".into(),
            format!("train.micro_batch={micro_batch}"),
            "train.grad_accum=2".into(),
            format!("train.steps={DP_STEPS}"),
            "train.log_every=1".into(),
            "train.eval_every=0".into(),
            "train.eval_batches=1".into(),
            "train.sample_tokens=0".into(),
            "train.threads=1".into(),
            "optim.warmup_steps=2".into(),
            format!("optim.lr={DP_LR:e}"),
            format!("optim.eps={ADAMW_EPS:e}"),
            "dist.bucket_mib=0.5".into(),
        ])
        .collect()
}

/// What [`dp_tolerance`] assumes of the runs of [`train_args`].
const DP_STEPS: usize = 6;
const DP_LR: f64 = 1e-3;
/// Rows a gradient element sums over: 12 sequences of the global batch × 2 streams × 64 positions.
const DP_SUMMANDS: usize = 12 * 2 * 64;

/// `data_parallel_tolerance` for these runs: 6 · 1e-3 · (2 · 1536 · 1.1e-16 · 25) / 1e-8 ≈ 5e-6
/// (they differ by about 4e-15 on an AVX2 CPU).
fn dp_tolerance() -> f64 {
    data_parallel_tolerance(DP_STEPS, DP_LR, DP_SUMMANDS)
}

/// The losses `rank` reported.
fn losses(stdout: &str, rank: usize) -> Vec<f64> {
    let prefix = format!("rank {rank} LOSSES ");
    let line =
        stdout.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_else(|| panic!("no losses of rank {rank}"));
    serde_json::from_str(line).unwrap()
}

#[test]
fn two_ranks_with_micro_batch_b_train_like_one_rank_with_2b() {
    let scratch = scratch_dir("dist");
    let run_dir = scratch.path().to_path_buf();
    // One plain process (no mpirun): micro-batch 4.
    let fp64_args = |name: &str, micro_batch: usize| {
        let mut args = train_args(&run_dir, name, micro_batch);
        args.push(FP64.into());
        args
    };
    let mut single = Command::new(CHECK);
    single.args(fp64_args("one", 4));
    let (out, stdout, stderr) = output(single);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let one = losses(&stdout, 0);
    // Two ranks: micro-batch 2 each.
    let args = fp64_args("two", 2);
    let (out, stdout, stderr) = mpirun(2, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let two = losses(&stdout, 0);
    assert_eq!(losses(&stdout, 1), two, "rank 1 logs the same averaged losses");

    assert_eq!(one.len(), DP_STEPS);
    assert_losses_close("2 ranks against 1", &one, &two, dp_tolerance());
    // Only rank 0 writes: one metrics line per step, and the weights.
    let metrics = std::fs::read_to_string(run_dir.join("two/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().filter(|l| l.contains("\"loss\"")).count(), 6);
    let w2 = final_weights(&run_dir.join("two"));
    assert_weights_close("2 ranks against 1", &final_weights(&run_dir.join("one")), &w2, dp_tolerance());
    // Both ranks wrote disjoint parts of the final checkpoint; assembled, its EMA weights are
    // exactly the weights rank 0 saved.
    let store = checkpoint::CheckpointStore::open(&run_dir.join("two/checkpoints").display().to_string()).unwrap();
    let manifest = store.manifest(6).unwrap();
    assert_eq!(manifest.world_size, 2);
    assert!(manifest.files.values().any(|f| f.rank == 1), "{:?}", manifest.files);
    let exported = run_dir.join("two-export.safetensors");
    trainer::weights::export_weights(&store, &manifest, false, &exported).unwrap();
    let mut w3 = Tensor::read_safetensors(&exported).unwrap();
    assert!(w3.iter().all(|(_, t)| t.kind() == tch::Kind::Double), "an fp64 run exports fp64 weights");
    w3.sort_by(|a, b| a.0.cmp(&b.0));
    for ((n2, t2), (n3, t3)) in w2.iter().zip(&w3) {
        assert_eq!(n2, n3);
        assert!(t2.equal(t3), "{n2}: the checkpoint's EMA weights differ from model.safetensors");
    }
    // And it did train.
    assert!(one[5] < one[0], "{one:?}");
}

/// The number `rank` printed after `key`.
fn reported(stdout: &str, rank: usize, key: &str) -> usize {
    let prefix = format!("rank {rank} {key} ");
    let line =
        stdout.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_else(|| panic!("no {key} of rank {rank}"));
    line.trim().parse().unwrap()
}

/// The final weights (`model.safetensors`: EMA) of a run, sorted by name.
fn final_weights(run: &Path) -> Vec<(String, Tensor)> {
    let mut w = Tensor::read_safetensors(run.join("model.safetensors")).unwrap();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

/// Asserts that every weight of `a` is within `tol` of `b`'s, and prints the largest difference
/// (the margin a tolerance has on this machine, for the log).
fn assert_weights_close(what: &str, a: &[(String, Tensor)], b: &[(String, Tensor)], tol: f64) {
    assert_eq!(a.len(), b.len(), "{what}");
    let mut largest = 0f64;
    for ((n1, t1), (n2, t2)) in a.iter().zip(b) {
        assert_eq!(n1, n2, "{what}");
        let diff = (t1 - t2).abs().max().double_value(&[]);
        assert!(diff <= tol, "{what}: {n1} differs by {diff} (tolerance {tol:e})");
        largest = largest.max(diff);
    }
    eprintln!("{what}: weights differ by {largest:e} at most (tolerance {tol:e})");
}

fn assert_losses_close(what: &str, a: &[f64], b: &[f64], rel: f64) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for (step, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= rel * x.abs(), "{what}, loss {}: {x} vs {y} (relative tolerance {rel:e})", step + 1);
    }
}

/// A copy of step 3 of run `from`'s checkpoints as run `to`'s, so that `to` resumes from it and
/// writes its own steps without touching `from`'s. (Only step 3: a step rewritten over another
/// run's files could mix in that run's rank indexes.)
fn copy_step_3(run_dir: &Path, from: &str, to: &str) {
    let step = "checkpoints/step-0000000003";
    let (src, dst) = (run_dir.join(from).join(step), run_dir.join(to).join(step));
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
    let status = Command::new("cp").arg("-r").arg(&src).arg(&dst).status().unwrap();
    assert!(status.success(), "cp -r {} {}", src.display(), dst.display());
}

/// Run `name` of [`train_args`] on `np` ranks (a plain process for 1) with a checkpoint every 3
/// steps and `extra` overrides; its stdout.
fn train_with_checkpoints(run_dir: &Path, np: usize, name: &str, micro_batch: usize, extra: &[&str]) -> String {
    let mut args = train_args(run_dir, name, micro_batch);
    args.push("checkpoint.every=3".into());
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (out, stdout, stderr) = if np == 1 {
        let mut cmd = Command::new(CHECK);
        cmd.args(&args);
        output(cmd)
    } else {
        mpirun(np, &args)
    };
    assert!(out.status.success(), "{name}: {}\n{stdout}\n{stderr}", out.status);
    stdout
}

#[test]
fn zero_on_and_off_train_alike_and_their_checkpoints_resume_across_modes_and_world_sizes() {
    let scratch = scratch_dir("zero");
    let run_dir = scratch.path().to_path_buf();
    let run = |np: usize, name: &str, micro_batch: usize, extra: &[&str]| {
        train_with_checkpoints(&run_dir, np, name, micro_batch, extra)
    };
    // Plain all-reduce and ZeRO-1, 2 ranks, 6 steps each.
    let plain = run(2, "plain", 2, &["dist.zero=false", FP64]);
    let zero = run(2, "zero", 2, &["dist.zero=true", FP64]);
    let (plain_losses, zero_losses) = (losses(&plain, 0), losses(&zero, 0));
    assert_eq!(losses(&zero, 1), zero_losses, "rank 1 logs the same averaged losses");
    assert_eq!(zero_losses.len(), DP_STEPS);
    assert_losses_close("ZeRO against all-reduce", &plain_losses, &zero_losses, dp_tolerance());
    // The EMA weights (and so the weights they follow) agree.
    let plain_weights = final_weights(&run_dir.join("plain"));
    let zero_weights = final_weights(&run_dir.join("zero"));
    assert_weights_close("ZeRO against all-reduce", &plain_weights, &zero_weights, dp_tolerance());

    // Optimizer state per rank: both moments of every parameter without ZeRO; with it, both
    // moments of a 1/2 shard of the flat buffer: the parameters, each gradient bucket padded to
    // an even count (one element at most per bucket, and the tiny model's fill a few buckets).
    let full = reported(&plain, 0, "OPTIMIZER_STATE_ELEMENTS");
    assert_eq!(reported(&plain, 1, "OPTIMIZER_STATE_ELEMENTS"), full);
    let params = full / 2;
    let shard = reported(&zero, 0, "OPTIMIZER_STATE_ELEMENTS") / 2;
    assert_eq!(reported(&zero, 1, "OPTIMIZER_STATE_ELEMENTS"), 2 * shard);
    assert!((params.div_ceil(2)..=params.div_ceil(2) + 8).contains(&shard), "{shard} of {params}");

    // Run `to` resumes from step 3 of run `from` on `np` ranks of micro-batch `mb`.
    let resume = |from: &str, to: &str, np: usize, mb: usize, zero: bool| {
        copy_step_3(&run_dir, from, to);
        let out = run(np, to, mb, &[&format!("dist.zero={zero}"), "checkpoint.resume=\"3\"", FP64]);
        (losses(&out, 0), final_weights(&run_dir.join(to)))
    };
    // The ZeRO checkpoint of step 3 resumes with ZeRO on the same ranks exactly as the
    // uninterrupted run went on.
    let (resumed, weights) = resume("zero", "zero-resumed", 2, 2, true);
    assert_eq!(resumed, &zero_losses[3..], "ZeRO resumed from its step 3");
    assert_weights_close("ZeRO resumed", &zero_weights, &weights, 0.0);
    // Across the switch and world sizes, like the plain run: ZeRO's checkpoint without ZeRO on
    // one rank of micro-batch 4, and the plain run's checkpoint with ZeRO on 2 ranks.
    for (from, to, np, mb, zero) in [("zero", "zero-to-single", 1, 4, false), ("plain", "plain-to-zero", 2, 2, true)] {
        let (resumed, weights) = resume(from, to, np, mb, zero);
        assert_losses_close(to, &resumed, &plain_losses[3..], dp_tolerance());
        assert_weights_close(to, &plain_weights, &weights, dp_tolerance());
    }
}

#[test]
fn from_a_prepared_data_set_each_rank_reads_its_rows_and_resume_keeps_the_order_across_world_sizes() {
    let scratch = scratch_dir("dist-data");
    let run_dir = scratch.path().to_path_buf();
    // The demo corpus as shards of row groups of 4 sequences, so that a rank's rows fill only
    // some of them.
    let data = run_dir.join("data").display().to_string();
    let corpus = repo_root().join("data/shakespeare").display().to_string();
    let prepare = dataloader::PrepareConfig {
        shard_sequences: 256,
        row_group_sequences: 4,
        valid_documents: 1,
        progress: false,
        ..dataloader::PrepareConfig::new(&corpus, &data, 64)
    };
    dataloader::prepare(&prepare).unwrap();
    // A global batch of 12 sequences (micro-batch × 2 micro-steps × ranks).
    let dataset = format!("data.dataset={data:?}");
    let run = |np: usize, name: &str, extra: &[&str]| {
        let extra: Vec<&str> = [dataset.as_str(), FP64].into_iter().chain(extra.iter().copied()).collect();
        train_with_checkpoints(&run_dir, np, name, 6 / np, &extra)
    };
    let one = run(1, "one", &[]);
    let one_losses = losses(&one, 0);
    let one_bytes = reported(&one, 0, "DATA_BYTES_READ") as f64;
    for np in [2, 3] {
        let name = format!("ranks-{np}");
        let out = run(np, &name, &[]);
        // The same global batches with the same noise per row: the same training.
        assert_losses_close(&name, &losses(&out, 0), &one_losses, dp_tolerance());
        let weights = final_weights(&run_dir.join(&name));
        assert_weights_close(&name, &final_weights(&run_dir.join("one")), &weights, dp_tolerance());
        // Each rank read about 1/W of what one rank read (plus the row groups two ranks share,
        // at most one per boundary and window of 8 row groups read).
        for rank in 0..np {
            let ratio = reported(&out, rank, "DATA_BYTES_READ") as f64 / one_bytes;
            eprintln!("{np} ranks: rank {rank} read {ratio:.3} of one rank's row-group bytes");
            assert!(ratio <= 1.0 / np as f64 + 0.25, "rank {rank} of {np} read {ratio:.3} of one rank's bytes");
        }
    }
    // Resumed from step 3 on another world size, the data order goes on as uninterrupted.
    for (from, to, np) in [("ranks-2", "two-to-one", 1), ("one", "one-to-three", 3)] {
        copy_step_3(&run_dir, from, to);
        let out = run(np, to, &["checkpoint.resume=\"3\""]);
        assert_losses_close(to, &losses(&out, 0), &one_losses[3..], dp_tolerance());
        let weights = final_weights(&run_dir.join(to));
        assert_weights_close(to, &final_weights(&run_dir.join("one")), &weights, dp_tolerance());
    }
}

#[test]
fn validation_and_clip_search_shared_out_over_2_and_3_ranks_give_the_1_rank_numbers() {
    let scratch = scratch_dir("dist-valid");
    let mut args = train_args(scratch.path(), "valid", 2);
    args[0] = "validate".into();
    // 7 batches of 2 sequences for the NELBO and 5 for the clip search: unequal shares.
    args.extend(
        ["train.eval_batches=7", "diffusion.clip_search=true", "diffusion.clip_search_batches=5"].map(String::from),
    );
    let report = |stdout: &str, rank: usize| -> serde_json::Value {
        let prefix = format!("rank {rank} VALIDATION ");
        let line = stdout.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_else(|| panic!("{stdout}"));
        serde_json::from_str(line).unwrap()
    };
    let mut single = Command::new(CHECK);
    single.args(&args);
    let (out, stdout, stderr) = output(single);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let one = report(&stdout, 0);
    assert_eq!(one["tokens"], 7 * 2 * 63);
    // Every batch (2 sequences, its own noise stream) is scored by the same code on one thread
    // whichever rank has it, so its fp64 sums are the same bits everywhere: only the order in
    // which the 7 (5) positive per-batch sums are added differs, within 2·n·u relative.
    let rel = reordered_sum_bound(7, 1.0);
    let close = |a: &serde_json::Value, b: &serde_json::Value| {
        let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
        (a - b).abs() <= rel * a.abs()
    };
    for np in [2, 3] {
        let (out, stdout, stderr) = mpirun(np, &args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(out.status.success(), "{stdout}\n{stderr}");
        for rank in 0..np {
            let shared = report(&stdout, rank);
            assert_eq!(shared["tokens"], one["tokens"], "rank {rank} of {np}");
            assert!(close(&shared["nll"], &one["nll"]), "rank {rank} of {np}: NELBO {shared} against {one}");
            let (c1, c2) = (&one["clip"], &shared["clip"]);
            assert_eq!((&c2[0], &c2[1]), (&c1[0], &c1[1]), "rank {rank} of {np}: the same winning interval");
            assert!(close(&c2[2], &c1[2]), "rank {rank} of {np}: its variance {c2} against {c1}");
        }
    }
}

#[test]
fn gradients_reduced_during_backward_train_bitwise_like_reduced_after() {
    let scratch = scratch_dir("dist-overlap");
    let run_dir = scratch.path().to_path_buf();
    let run = |name: &str, overlap: bool, zero: bool| {
        let mut args = train_args(&run_dir, name, 2);
        // Small buckets: the model's gradients fill several, reduced one by one during backward.
        args.extend([format!("dist.overlap={overlap}"), format!("dist.zero={zero}"), "dist.bucket_mib=0.05".into()]);
        let (out, stdout, stderr) = mpirun(2, &args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(out.status.success(), "{name}: {stdout}\n{stderr}");
        stdout
    };
    // All-reduced (replicated AdamW) and reduce-scattered (ZeRO-1) buckets.
    for zero in [false, true] {
        let (a, d) = if zero { ("zero-after", "zero-during") } else { ("after", "during") };
        let (after, during) = (run(a, false, zero), run(d, true, zero));
        for rank in 0..2 {
            assert_eq!(reported(&after, rank, "OVERLAPPED_STEPS"), 0);
            // Every step but the first, whose gradients are not yet views of the buckets.
            assert_eq!(reported(&during, rank, "OVERLAPPED_STEPS"), 5, "{d}, rank {rank}");
        }
        // The same buckets reduced by the same collective in the same order: the same bits.
        assert_eq!(losses(&during, 0), losses(&after, 0), "{d}");
        assert_weights_close(d, &final_weights(&run_dir.join(a)), &final_weights(&run_dir.join(d)), 0.0);
    }
}

/// The rank (OMPI_COMM_WORLD_RANK) of process `pid`, from its environment.
fn rank_of(pid: i32) -> Option<usize> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    environ
        .split(|&b| b == 0)
        .find_map(|var| var.strip_prefix(b"OMPI_COMM_WORLD_RANK="))
        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
}

/// Whether process `pid` still exists (a zombie no longer runs: it counts as gone).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn one_of_3_ranks_killed_mid_training_ends_the_job_with_an_error_and_no_process_left() {
    let scratch = scratch_dir("dist-kill");
    let run_dir = scratch.path().to_path_buf();
    let (mut job, ranks) = start_endless_training(&run_dir, "kill", 3, &["dist.timeout_s=20"]);
    let victim = *ranks.iter().find(|&&pid| rank_of(pid) == Some(1)).expect("the process of rank 1");
    // SAFETY: kill only sends a signal to a process this test started.
    assert_eq!(unsafe { libc::kill(victim, libc::SIGKILL) }, 0);
    // A hang guard only, far above dist.timeout_s: the job must end by itself.
    let started = std::time::Instant::now();
    while job.try_wait().unwrap().is_none() {
        if started.elapsed() > std::time::Duration::from_secs(300) {
            for &pid in &ranks {
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let _ = job.kill();
            panic!("the job did not end within 300 s of rank 1's death");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = job.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the job succeeded after losing a rank:\n{stderr}");
    // The ranks are gone, or on their way out: mpirun has killed them or their watchdogs end them
    // after dist.timeout_s. (A hang guard again, not a speed claim.)
    let started = std::time::Instant::now();
    let mut left: Vec<i32> = ranks.clone();
    while !left.is_empty() && started.elapsed() < std::time::Duration::from_secs(120) {
        std::thread::sleep(std::time::Duration::from_millis(100));
        left.retain(|&pid| alive(pid));
    }
    assert!(left.is_empty(), "processes left behind: {left:?}\n{stderr}");
}

/// Starts `np` ranks training for (nearly) ever, as run `name`, and waits until rank 0 has
/// logged two steps: every rank is inside the training loop. Returns mpirun and its children.
fn start_endless_training(run_dir: &Path, name: &str, np: usize, extra: &[&str]) -> (std::process::Child, Vec<i32>) {
    let mut args = train_args(run_dir, name, 2);
    args.retain(|a| !a.starts_with("train.steps="));
    args.push("train.steps=100000".into());
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut cmd = mpirun_command(np);
    cmd.arg(CHECK).args(&args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut job = cmd.spawn().expect("starting mpirun");
    let metrics = run_dir.join(name).join("metrics.jsonl");
    while std::fs::read_to_string(&metrics).map_or(true, |m| m.lines().count() < 2) {
        assert!(job.try_wait().unwrap().is_none(), "the job ended before training");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let ranks = children(job.id());
    assert_eq!(ranks.len(), np, "mpirun's children: {ranks:?}");
    (job, ranks)
}

/// The processes mpirun started (its children, whichever of its threads forked them).
fn children(pid: u32) -> Vec<i32> {
    let mut out = vec![];
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(list.split_whitespace().map(|p| p.parse::<i32>().unwrap()));
    }
    out.sort();
    out
}

#[test]
fn sigterm_to_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint() {
    let scratch = scratch_dir("dist-stop");
    let run_dir = scratch.path().to_path_buf();
    let (job, ranks) = start_endless_training(&run_dir, "stop", 2, &[]);
    // SAFETY: kill only sends a signal to a process this test started.
    assert_eq!(unsafe { libc::kill(ranks[1], libc::SIGTERM) }, 0);
    let out = job.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    let (first, second) = (losses(&stdout, 0), losses(&stdout, 1));
    assert_eq!(first.len(), second.len(), "the ranks stopped after different steps");
    assert!(first.len() >= 2 && first.len() < 100_000, "stopped after {} steps", first.len());
    let store = checkpoint::CheckpointStore::open(&run_dir.join("stop/checkpoints").display().to_string()).unwrap();
    assert_eq!(store.committed_steps().unwrap().last(), Some(&(first.len() as u64)), "a checkpoint of the last step");
}

/// `train_args` for a 2-rank run of `steps` steps with dropout, the clip search at the end and
/// `extra`; the checkpoint writes and resumes of the fault tests.
fn fault_run_args(run_dir: &Path, name: &str, steps: u64, extra: &[&str]) -> Vec<String> {
    let mut args = train_args(run_dir, name, 2);
    args.retain(|a| !a.starts_with("train.steps=") && !a.starts_with("model.dropout=") && !a.contains("clip_search"));
    args.extend([format!("train.steps={steps}"), "model.dropout=0.1".into(), "checkpoint.resume=\"auto\"".into()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Starts `args` on 2 ranks and waits until `run`'s metrics log holds a training step past
/// `after`; returns mpirun and its children.
fn start_and_wait_for_step(args: &[String], run: &Path, after: u64) -> (std::process::Child, Vec<i32>) {
    let mut cmd = mpirun_command(2);
    cmd.arg(CHECK).args(args).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    let mut job = cmd.spawn().expect("starting mpirun");
    let last_step = || -> u64 {
        let log = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64())
            .max()
            .unwrap_or(0)
    };
    while last_step() <= after {
        assert!(job.try_wait().unwrap().is_none(), "the job ended before step {}", after + 1);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let ranks = children(job.id());
    (job, ranks)
}

#[test]
fn two_ranks_stopped_by_sigterm_resume_bit_for_bit() {
    let scratch = scratch_dir("dist-sigterm");
    let run_dir = scratch.path().to_path_buf();
    let straight = fault_run_args(&run_dir, "straight", 30, &[]);
    let (out, stdout, stderr) = mpirun(2, &straight.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{stdout}\n{stderr}");

    let stopped = fault_run_args(&run_dir, "stopped", 30, &["checkpoint.every=0"]);
    let (job, ranks) = start_and_wait_for_step(&stopped, &run_dir.join("stopped"), 2);
    // SAFETY: kill only sends a signal to a process this test started.
    assert_eq!(unsafe { libc::kill(ranks[1], libc::SIGTERM) }, 0);
    assert!(job.wait_with_output().unwrap().status.success());
    let store = checkpoint::CheckpointStore::open(&run_dir.join("stopped/checkpoints").display().to_string()).unwrap();
    let at = *store.committed_steps().unwrap().last().expect("a checkpoint at the stop");
    assert!(at < 30, "the signal came too late to test anything: stopped at {at}");

    let (out, stdout, stderr) = mpirun(2, &stopped.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let read = |run: &str| std::fs::read(run_dir.join(run).join("model.safetensors")).unwrap();
    assert!(read("straight") == read("stopped"), "final weights differ after a stop at step {at}");
}

/// A 2-rank run SIGKILLed at random moments (checkpoints every step and saved in the background,
/// so most kills land inside an asynchronous save) and auto-resumed each time ends with the
/// same weights, byte for byte, as a run that was never interrupted.
#[test]
fn killed_at_random_moments_and_resumed_a_run_ends_as_an_uninterrupted_one() {
    let scratch = scratch_dir("dist-chaos");
    let run_dir = scratch.path().to_path_buf();
    let every_step = ["checkpoint.every=1", "checkpoint.async_save=true", "checkpoint.keep_latest=2"];
    let straight = fault_run_args(&run_dir, "straight", 16, &every_step);
    let (out, stdout, stderr) = mpirun(2, &straight.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{stdout}\n{stderr}");

    let chaos = fault_run_args(&run_dir, "chaos", 16, &every_step);
    let mut rng = trainer::rng::NoiseRng::new(2026, 0, 0, 0);
    let mut after = 0;
    for kill in 0..3 {
        let (mut job, ranks) = start_and_wait_for_step(&chaos, &run_dir.join("chaos"), after);
        std::thread::sleep(std::time::Duration::from_millis(rng.below(300) as u64));
        for &pid in &ranks {
            // SAFETY: kill only sends a signal to a process this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = job.kill();
        let _ = job.wait();
        while ranks.iter().any(|&pid| alive(pid)) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let store =
            checkpoint::CheckpointStore::open(&run_dir.join("chaos/checkpoints").display().to_string()).unwrap();
        after = store.committed_steps().unwrap().last().copied().unwrap_or(0);
        assert!(after < 16, "kill {kill} came after the end of training");
    }
    let (out, stdout, stderr) = mpirun(2, &chaos.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let read = |run: &str| std::fs::read(run_dir.join(run).join("model.safetensors")).unwrap();
    assert!(read("straight") == read("chaos"), "final weights differ after three kills");
}
