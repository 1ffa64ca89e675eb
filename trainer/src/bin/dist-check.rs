//! What the multi-process tests (`trainer/tests/dist.rs`) start under mpirun:
//!
//! * `dist-check collectives`: every collective, on odd sizes and every supported type, checked
//!   against a serial reference that each rank computes from all ranks' inputs;
//! * `dist-check nccl-collectives` (feature `cuda`, on a GPU machine): the same checks over NCCL
//!   on CUDA device `local rank` (kernels/gpu-check.sh runs it);
//! * `dist-check hang TIMEOUT_S`: the last rank stops taking part, the others wait in a barrier
//!   until the watchdog ends them;
//! * `dist-check train CONFIG [SECTION.FIELD=VALUE …]`: `trainer::train::train`, printing the
//!   per-step losses of this run, the number of optimizer-state elements it held, the bytes of
//!   row groups it read and the steps whose reduction overlapped backward, on every rank;
//! * `dist-check validate CONFIG [SECTION.FIELD=VALUE …]`: validation (NELBO and clip search) of
//!   freshly initialized weights, its batches shared out over the ranks, printed on every rank;
//! * `dist-check overlap cpu|cuda`: the gradients of a small MLP averaged while backward runs
//!   (`trainer::dist::Overlap`: over MPI on the CPU, over NCCL on a communication stream on the
//!   local rank's GPU) must be bit-identical to the same collectives after backward; one JSON line
//!   per rank with the time of each way and, on CUDA, the all-reduce bandwidth at a few sizes
//!   (kernels/gpu-check.sh runs it on 1 GPU, trainer/tests/dist.rs on 2 CPU ranks);
//! * `dist-check step-bench CONFIG [--steps N] [SECTION.FIELD=VALUE …]` (one process; the
//!   `train_step` of kernels/gpu-check.sh): N timed training steps per attention backend, one
//!   JSON line with tokens/s, step time, MFU and final loss of each, and whether the losses agree.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kernels::Backend;
use serde_json::json;
use tch::{Device, Kind, Tensor};
use trainer::config::ResumeFrom;
use trainer::dist::{self, all_reduce_bucketed, Communicator, DistOptions, GradBuckets, Overlap, ReduceOp};
use trainer::flops::{device_peak_flops, gpu_name, mfu, training_flops_per_step};
use trainer::telemetry::Telemetry;
use trainer::train::Trainer;
use trainer::Config;

fn main() {
    if let Err(e) = run() {
        eprintln!("dist-check: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("collectives") => {
            let dist = dist::init(DistOptions { timeout: Duration::from_secs(120) })?;
            let checks = collectives(dist.comm(), Device::Cpu)?;
            println!("rank {}/{}: {checks} checks passed", dist.comm().rank(), dist.comm().world_size());
            Ok(())
        }
        #[cfg(feature = "cuda")]
        Some("nccl-collectives") => {
            let timeout = Duration::from_secs(120);
            let dist = dist::init(DistOptions { timeout })?;
            let nccl = dist::nccl::NcclComm::init(dist.comm(), dist.placement.local_rank, timeout)?;
            let checks = collectives(&nccl, nccl.device())?;
            println!(
                "rank {}/{} (NCCL on {:?}): {checks} checks passed",
                nccl.rank(),
                nccl.world_size(),
                nccl.device()
            );
            Ok(())
        }
        Some("hang") => {
            let timeout: f64 = args.get(1).context("hang TIMEOUT_S")?.parse()?;
            let dist = dist::init(DistOptions { timeout: Duration::from_secs_f64(timeout) })?;
            let comm = dist.comm();
            comm.barrier()?;
            if comm.rank() + 1 == comm.world_size() {
                // A peer that stopped calling collectives (stuck, or in a step the others left).
                std::thread::sleep(Duration::from_secs(3600));
            }
            comm.barrier()?;
            bail!("rank {}: the barrier completed without its last rank", comm.rank())
        }
        Some("train") => {
            let path = args.get(1).context("train CONFIG [OVERRIDES]")?;
            let cfg = trainer::Config::load(path.as_ref(), &args[2..])?;
            let rank = dist::Placement::from_env()?.unwrap_or(dist::Placement::SINGLE).rank;
            let out = trainer::train::train(&cfg)?;
            println!("rank {rank} LOSSES {}", serde_json::to_string(&out.losses)?);
            println!("rank {rank} OPTIMIZER_STATE_ELEMENTS {}", out.optimizer_state_elements);
            println!("rank {rank} DATA_BYTES_READ {}", out.data_bytes_read);
            println!("rank {rank} OVERLAPPED_STEPS {}", out.overlapped_steps);
            Ok(())
        }
        Some("validate") => {
            let path = args.get(1).context("validate CONFIG [OVERRIDES]")?;
            let cfg = trainer::Config::load(path.as_ref(), &args[2..])?;
            let dist = dist::init(cfg.dist.options())?;
            if cfg.train.threads > 0 {
                tch::set_num_threads(cfg.train.threads as i32);
            }
            // The same initial weights on every rank.
            tch::manual_seed(cfg.train.seed as i64);
            let mut vs = tch::nn::VarStore::new(Device::Cpu);
            let model = trainer::Dit::build(&mut vs, &cfg.model)?;
            let objective = trainer::objective::Objective::new(&cfg)?;
            let valid = trainer::data::split_tokens(&cfg, dataloader::SplitName::Valid, None)?;
            let v = trainer::validation::validation(&model, &objective, &valid, &cfg, dist.comm())?;
            let clip = v.clip.map(|(c, variance)| [c.beta, c.omega, variance]);
            let report = serde_json::json!({ "nll": v.nelbo.nll, "tokens": v.nelbo.tokens, "clip": clip });
            println!("rank {} VALIDATION {report}", dist.comm().rank());
            Ok(())
        }
        Some("overlap") => {
            let timeout = Duration::from_secs(120);
            let dist = dist::init(DistOptions { timeout })?;
            let report = match args.get(1).map(String::as_str) {
                Some("cpu") => {
                    tch::set_num_threads(1);
                    overlap_check(dist.comm(), Device::Cpu)?
                }
                #[cfg(feature = "cuda")]
                Some("cuda") => {
                    let nccl = dist::nccl::NcclComm::init(dist.comm(), dist.placement.local_rank, timeout)?;
                    let mut report = overlap_check(&nccl, nccl.device())?;
                    report["all_reduce_bandwidth"] = all_reduce_bandwidth(&nccl, nccl.device())?;
                    report
                }
                _ => bail!("overlap cpu|cuda (cuda needs the feature `cuda`)"),
            };
            println!("rank {} OVERLAP {report}", dist.comm().rank());
            ensure!(
                report["bitwise_equal"] == json!(true),
                "the overlapped gradients differ from those reduced after backward"
            );
            ensure!(
                report["world_size"] == json!(1) || report["reduction_changed_gradients"] == json!(true),
                "the reduction over several ranks left the gradients as they were"
            );
            ensure!(
                report["ordered"] == json!(true),
                "a collective beside compute was not ordered with the compute stream"
            );
            Ok(())
        }
        Some("step-bench") => step_bench(&args[1..]),
        _ => bail!(
            "usage: dist-check collectives | nccl-collectives | hang TIMEOUT_S | train CONFIG [OVERRIDES] | \
             validate CONFIG [OVERRIDES] | overlap cpu|cuda | step-bench CONFIG [--steps N] [OVERRIDES]"
        ),
    }
}

/// `overlap`: an MLP of `LAYERS` × (`WIDTH`² weights + bias), its gradients in 1 MiB buckets (one
/// weight each), its input different on every rank. The gradients reduced by the same collectives
/// (`*_beside_compute`) after backward are the reference; those of [`Overlap::backward_reducing`]
/// must equal them bit for bit. Then `REPEATS` steps of each way are timed.
fn overlap_check(comm: &dyn Communicator, device: Device) -> Result<serde_json::Value> {
    const LAYERS: usize = 8;
    const WIDTH: i64 = 512;
    const BATCH: i64 = 256;
    const REPEATS: usize = 10;
    tch::manual_seed(7);
    let params: Vec<Tensor> = (0..LAYERS)
        .flat_map(|_| {
            let w = Tensor::randn([WIDTH, WIDTH], (Kind::Float, device)) / (WIDTH as f64).sqrt();
            [w, Tensor::zeros([WIDTH], (Kind::Float, device))]
        })
        .map(|t| t.set_requires_grad(true))
        .collect();
    tch::manual_seed(100 + comm.rank() as i64);
    let x = Tensor::randn([BATCH, WIDTH], (Kind::Float, device));
    let backward = || {
        let mut h = x.shallow_clone();
        for layer in params.chunks(2) {
            h = (h.matmul(&layer[0]) + &layer[1]).tanh();
        }
        h.square().mean(Kind::Float).backward();
    };
    let buckets = GradBuckets::new(&params, 1 << 20);
    let zero = || {
        for b in buckets.buckets() {
            let _ = b.shallow_clone().zero_();
        }
    };
    let after = || -> Result<()> {
        zero();
        backward();
        buckets.adopt_gradients(&params)?;
        for b in buckets.buckets() {
            comm.all_reduce_beside_compute(b, ReduceOp::Avg)?;
        }
        comm.finish_beside_compute()
    };
    let hooks = Overlap::install(&params, &buckets)?;
    let overlapped = || -> Result<()> {
        zero();
        hooks.backward_reducing(comm, &buckets, backward, || buckets.adopt_gradients(&params))
    };
    // The first backward makes the gradients views of the buckets; the hooks do nothing outside
    // backward_reducing.
    after()?;
    // This rank's own gradients, which the reduction must change on more than one rank.
    zero();
    backward();
    let local: Vec<Tensor> = buckets.buckets().iter().map(Tensor::copy).collect();
    after()?;
    let reference: Vec<Tensor> = buckets.buckets().iter().map(Tensor::copy).collect();
    let reduction_changed_them = local.iter().zip(&reference).any(|(l, r)| !l.equal(r));
    overlapped()?;
    let bitwise_equal = reference.iter().zip(buckets.buckets()).all(|(want, got)| want.equal(got));
    let time = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
        synchronize(device);
        let started = Instant::now();
        for _ in 0..REPEATS {
            f()?;
        }
        synchronize(device);
        Ok(started.elapsed().as_secs_f64() * 1e3 / REPEATS as f64)
    };
    let (after_ms, overlapped_ms) = (time(&after)?, time(&overlapped)?);
    let ordered = ordering_probe(comm, device)?;
    Ok(json!({
        "rank": comm.rank(),
        "world_size": comm.world_size(),
        "device": format!("{device:?}"),
        "buckets": buckets.buckets().len(),
        "bitwise_equal": bitwise_equal,
        "reduction_changed_gradients": reduction_changed_them,
        "ordered": ordered,
        "reduced_after_backward_ms": after_ms,
        "overlapped_ms": overlapped_ms,
    }))
}

/// Whether a collective beside compute sees the values the compute stream wrote just before it
/// (after a long chain of matrix products) and its result is seen after `finish_beside_compute`:
/// a reduce-scatter, which copies even on one rank (where an all-reduce in place changes
/// nothing), against the same reduce-scatter waited for afterwards. Over NCCL a missing event
/// on either side shows as stale or unwritten values; over MPI it checks the same contract.
fn ordering_probe(comm: &dyn Communicator, device: Device) -> Result<bool> {
    let (side, chain) = if device.is_cuda() { (4096, 16) } else { (128, 4) };
    let n = 1 << 22;
    tch::manual_seed(11 + comm.rank() as i64);
    let values = Tensor::randn([n as i64 * comm.world_size() as i64], (Kind::Float, device));
    let input = Tensor::zeros_like(&values);
    let mut a = Tensor::randn([side, side], (Kind::Float, device)) / (side as f64).sqrt();
    for _ in 0..chain {
        a = a.matmul(&a).tanh();
    }
    // Written only once the chain has run: a collective not ordered after it reads zeros.
    tch::no_grad(|| input.shallow_clone().copy_(&(&values + a.sum(Kind::Float) * 0.0)));
    let beside = comm.reduce_scatter_beside_compute(&input, ReduceOp::Sum)?;
    comm.finish_beside_compute()?;
    let seen = beside.copy();
    let waited = comm.reduce_scatter(&input, ReduceOp::Sum)?;
    Ok(seen.equal(&waited))
}

/// nccl-tests' figures for the blocking all-reduce at a few sizes: algorithm bandwidth (bytes /
/// time) and bus bandwidth (× 2(n − 1)/n, what each link carries in a ring; 0 on one rank, as
/// nccl-tests prints), in GB/s.
#[cfg(feature = "cuda")]
fn all_reduce_bandwidth(comm: &dyn Communicator, device: Device) -> Result<serde_json::Value> {
    const REPEATS: u32 = 20;
    let n = comm.world_size() as f64;
    let mut rows = Vec::new();
    for mib in [1i64, 16, 128] {
        let t = Tensor::ones([mib << 18], (Kind::Float, device));
        comm.all_reduce(&t, ReduceOp::Sum)?;
        synchronize(device);
        let started = Instant::now();
        for _ in 0..REPEATS {
            comm.all_reduce(&t, ReduceOp::Sum)?;
        }
        synchronize(device);
        let seconds = started.elapsed().as_secs_f64() / REPEATS as f64;
        let algbw = (mib << 20) as f64 / seconds / 1e9;
        rows.push(
            json!({"mib": mib, "us": seconds * 1e6, "algbw_gbs": algbw, "busbw_gbs": algbw * 2.0 * (n - 1.0) / n}),
        );
    }
    Ok(json!(rows))
}

/// Steps each backend trains before the timed ones: the first steps pay for allocations, library
/// heuristics and lazy initialization, which are not the steady state.
const WARMUP_STEPS: u64 = 2;

/// `step-bench CONFIG [--steps N] [OVERRIDES]`: for each attention backend the device offers, a
/// fresh model from the same seed trains `WARMUP_STEPS` + N steps of the real objective through
/// [`Trainer::step`] (the config's micro-batch, bf16 autocast on CUDA when `train.bf16`); N are
/// timed. Prints one JSON line; fails when a backend failed or the losses disagree.
fn step_bench(args: &[String]) -> Result<()> {
    const USAGE: &str = "step-bench CONFIG [--steps N] [SECTION.FIELD=VALUE …]";
    let path = args.first().context(USAGE)?;
    let (mut steps, mut overrides) = (10u64, Vec::new());
    let mut rest = args[1..].iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--steps" => steps = rest.next().context(USAGE)?.parse().context("--steps N")?,
            _ => overrides.push(arg.clone()),
        }
    }
    ensure!(steps > 0, "--steps must be positive");
    let mut cfg = Config::load(path.as_ref(), &overrides)?;
    let dist = dist::init(cfg.dist.options())?;
    ensure!(dist.comm().world_size() == 1, "step-bench runs as one process, not under a launcher");
    let gpus = tch::Cuda::device_count().max(0) as usize;
    let device = trainer::device::rank_device(cfg.train.device, &dist.placement, gpus)?;
    // Dense first: it is the reference the others are compared with, and an error in the fused
    // kernels (never run on a GPU yet) that leaves the CUDA context unusable then costs only
    // their own measurement.
    let backends: &[Backend] = if device.is_cuda() {
        &[Backend::Dense, Backend::SdpaTiles, Backend::Fused]
    } else {
        &[Backend::Dense, Backend::SdpaTiles]
    };
    // A measurement starts fresh and leaves nothing behind: run directories in a scratch
    // directory removed at the end, no checkpoint to resume, no metrics endpoint.
    let scratch = std::env::temp_dir().join(format!("bd3-step-bench-{}", std::process::id()));
    cfg.run.dir = scratch.clone();
    cfg.checkpoint.url.clear();
    cfg.checkpoint.resume = ResumeFrom::None;
    cfg.metrics.listen.clear();
    cfg.train.steps = WARMUP_STEPS + steps;

    let bf16 = cfg.train.bf16 && device.is_cuda(); // Trainer::step's autocast rule
    let tokens_per_step = (cfg.train.micro_batch * cfg.train.grad_accum * cfg.model.seq_len) as f64;
    let flops_per_step = training_flops_per_step(&cfg, 1)?;
    let peak = device_peak_flops(cfg.metrics.peak_tflops, device);
    let mut runs = Vec::new();
    for &backend in backends {
        cfg.model.attention = backend;
        let name = backend.name().to_string();
        cfg.run.name = name.clone();
        eprintln!("step-bench: {name} on {device:?}, {WARMUP_STEPS} + {steps} steps");
        let run = timed_steps(&cfg, dist.comm(), device, steps);
        // As it goes: if a later backend hangs and is killed, the earlier ones' results remain.
        match &run {
            Ok(r) => eprintln!(
                "step-bench: {name}: {:.1} ms/step, final loss {:.4}",
                1e3 * r.step_seconds,
                r.losses.last().copied().unwrap_or(f64::NAN)
            ),
            Err(e) => eprintln!("step-bench: {name}: {e:#}"),
        }
        runs.push((name, run));
    }
    // Best effort: a leftover scratch directory is not worth failing the measurement for.
    let _ = std::fs::remove_dir_all(&scratch);

    // Same seed, data and noise, so the backends differ only by the attention's rounding: bf16
    // rounds at every layer and the steps compound it, fp32 agrees to a few ulps per op.
    let tolerance = if bf16 { 5e-2 } else { 1e-4 };
    // Dense's losses, unless dense itself failed.
    let reference = runs.iter().find_map(|(_, r)| r.as_ref().ok()).map(|r| r.losses.clone());
    let mut diffs = Vec::new();
    let mut entries = Vec::new();
    for (name, run) in &runs {
        entries.push(match run {
            Ok(r) => {
                let reference = reference.as_deref().unwrap_or(&r.losses);
                diffs.extend(r.losses.iter().zip(reference).map(|(a, b)| (a - b).abs() / b.abs()));
                json!({
                    "backend": name,
                    "tokens_per_s": tokens_per_step / r.step_seconds,
                    "step_ms": 1e3 * r.step_seconds,
                    "mfu": peak.map(|p| mfu(flops_per_step, 1, r.step_seconds, p)),
                    "loss": r.losses.last(),
                })
            }
            Err(e) => json!({ "backend": name, "error": format!("{e:#}") }),
        });
    }
    let failed = runs.iter().filter(|(_, r)| r.is_err()).count();
    // A NaN difference (a NaN loss under train.on_nonfinite = "skip") is never within tolerance.
    let agree = failed == 0 && diffs.iter().all(|&d| d <= tolerance);
    let max_rel_diff = diffs.iter().copied().fold(0.0, f64::max);
    let device_name = match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".to_string(),
    };
    let report = json!({
        "device": device_name,
        "gpu": match device { Device::Cuda(i) => gpu_name(i), _ => None },
        "dtype": if bf16 { "bf16" } else { "fp32" },
        "micro_batch": cfg.train.micro_batch,
        "seq_len": cfg.model.seq_len,
        "steps": steps,
        "model_flops_per_step": flops_per_step,
        "backends": entries,
        "max_rel_diff": max_rel_diff,
        "tolerance": tolerance,
        "agree": agree,
    });
    println!("{report}");
    ensure!(failed == 0, "{failed} of {} backends failed (see \"error\" above)", runs.len());
    ensure!(agree, "the backends' losses differ by up to {max_rel_diff:.3e} (relative), above {tolerance:e}");
    Ok(())
}

/// What one backend's run of [`step_bench`] measured.
struct TimedSteps {
    /// The loss of every step, warm-up included.
    losses: Vec<f64>,
    /// Mean wall-clock seconds of a timed step.
    step_seconds: f64,
}

/// Builds the run of `cfg` as the training loop does ([`Trainer::new`]) and trains `WARMUP_STEPS`
/// untimed steps, then `steps` timed ones.
fn timed_steps(cfg: &Config, comm: &dyn Communicator, device: Device, steps: u64) -> Result<TimedSteps> {
    let telemetry = Telemetry::start("", &cfg.run.name, 0, 0, device.is_cuda())?;
    let mut trainer = Trainer::new(cfg, comm, device, telemetry)?;
    let mut losses = Vec::new();
    for step in 0..WARMUP_STEPS {
        losses.push(trainer.step(step)?.loss);
    }
    // CUDA queues work: the clock starts and stops with the device idle.
    synchronize(device);
    let started = Instant::now();
    for step in WARMUP_STEPS..WARMUP_STEPS + steps {
        losses.push(trainer.step(step)?.loss);
    }
    synchronize(device);
    Ok(TimedSteps { losses, step_seconds: started.elapsed().as_secs_f64() / steps as f64 })
}

fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Rank `rank`'s input of `n` elements: distinct per rank and element, of mixed sign and scale.
fn input(rank: usize, n: usize, kind: Kind) -> Tensor {
    let values: Vec<f64> = (0..n).map(|i| ((rank * 7919 + i) as f64 * 0.618).sin() * (1.0 + (i % 13) as f64)).collect();
    Tensor::from_slice(&values).to_kind(kind)
}

/// [`input`] on `device`, where the collectives under test run.
fn input_on(rank: usize, n: usize, kind: Kind, device: Device) -> Tensor {
    input(rank, n, kind).to_device(device)
}

/// The serial reference of a sum over ranks: in f64, rounded once to `kind` (the MPI sum of f32
/// or widened bf16 rounds at each partial sum, hence the tolerances below).
fn serial_sum(world: usize, n: usize, kind: Kind) -> Tensor {
    let mut sum = Tensor::zeros([n as i64], (Kind::Double, tch::Device::Cpu));
    for r in 0..world {
        sum += input(r, n, kind).to_kind(Kind::Double);
    }
    sum
}

fn check_close(what: &str, got: &Tensor, want: &Tensor) -> Result<()> {
    let got = &got.to_device(Device::Cpu);
    ensure!(got.size() == want.size(), "{what}: shape {:?}, expected {:?}", got.size(), want.size());
    // Relative to the largest value (scale ≥ 1). Every partial sum of [`input`]'s values (|x| ≤
    // 13) over W ≤ 3 ranks is at most 39 in magnitude, so W − 1 ≤ 2 roundings move an f64 or f32
    // sum by at most 2·39·u (u = 2⁻⁵³: 9e-15; 2⁻²⁴: 4.6e-6), below 1e-12 and 1e-5. bf16 is
    // summed widened and rounded once: at most 2⁻⁹ of the scale, below 2⁻⁶.
    let tol = match got.kind() {
        Kind::Double => 1e-12,
        Kind::Float => 1e-5,
        _ => 2.0f64.powi(-6),
    };
    let (g, w) = (got.to_kind(Kind::Double), want.to_kind(Kind::Double));
    let err = (&g - &w).abs().max().double_value(&[]);
    let scale = w.abs().max().double_value(&[]).max(1.0);
    ensure!(err <= tol * scale, "{what}: max abs error {err} exceeds {tol} × {scale}");
    Ok(())
}

fn check_equal(what: &str, got: &Tensor, want: &Tensor) -> Result<()> {
    let got = &got.to_device(Device::Cpu);
    ensure!(got.kind() == want.kind() && got.size() == want.size(), "{what}: kind or shape differ");
    ensure!(got.equal(want), "{what}: not bit-identical to the reference");
    Ok(())
}

/// Every collective of `comm` on tensors on `device`, against serial references on the CPU.
fn collectives(comm: &dyn Communicator, device: Device) -> Result<usize> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let mut checks = 0;
    for kind in [Kind::Float, Kind::Double, Kind::BFloat16] {
        for n in [1usize, 7, 1023, 100_003] {
            let what = |op: &str| format!("{op} of {n} × {kind:?} on rank {rank}/{world}");
            let sum = serial_sum(world, n, kind);

            let t = input_on(rank, n, kind, device);
            comm.all_reduce(&t, ReduceOp::Sum)?;
            check_close(&what("all_reduce(sum)"), &t, &sum)?;
            let t = input_on(rank, n, kind, device);
            comm.all_reduce(&t, ReduceOp::Avg)?;
            check_close(&what("all_reduce(avg)"), &t, &(&sum / world as f64))?;

            // reduce_scatter: every rank contributes world × n elements and keeps its n.
            let full = |r: usize| input(r, n * world, kind);
            let mut full_sum = Tensor::zeros([(n * world) as i64], (Kind::Double, tch::Device::Cpu));
            for r in 0..world {
                full_sum += full(r).to_kind(Kind::Double);
            }
            let part = full_sum.narrow(0, (rank * n) as i64, n as i64);
            let got = comm.reduce_scatter(&full(rank).to_device(device), ReduceOp::Sum)?;
            check_close(&what("reduce_scatter(sum)"), &got, &part)?;
            let got =
                comm.reduce_scatter(&full(rank).view([world as i64, n as i64]).to_device(device), ReduceOp::Avg)?;
            check_close(&what("reduce_scatter(avg)"), &got, &(&part / world as f64))?;

            let gathered = comm.all_gather(&input_on(rank, n, kind, device))?;
            let want = Tensor::cat(&(0..world).map(|r| input(r, n, kind)).collect::<Vec<_>>(), 0);
            check_equal(&what("all_gather"), &gathered, &want)?;

            let root = world - 1;
            let t = input_on(rank, n, kind, device);
            comm.broadcast(&t, root)?;
            check_equal(&what("broadcast"), &t, &input(root, n, kind))?;
            checks += 7;
        }
    }

    // Buckets: tensors of mixed sizes and types, with a bucket smaller than some tensors.
    let specs = [(5, Kind::Float), (300, Kind::Float), (2, Kind::Float), (9, Kind::Double), (1000, Kind::Float)];
    let tensors: Vec<Tensor> = specs
        .iter()
        .enumerate()
        .map(|(i, &(n, kind))| input_on(rank + 10 * i, n, kind, device).view([-1, 1]))
        .collect();
    all_reduce_bucketed(comm, &tensors, ReduceOp::Avg, 1024)?;
    for (i, &(n, kind)) in specs.iter().enumerate() {
        let mut sum = Tensor::zeros([n as i64], (Kind::Double, tch::Device::Cpu));
        for r in 0..world {
            sum += input(r + 10 * i, n, kind).to_kind(Kind::Double);
        }
        check_close(&format!("bucketed all_reduce of tensor {i}"), &tensors[i].view([-1]), &(sum / world as f64))?;
        checks += 1;
    }

    // Arguments every rank gets wrong alike are refused before any communication.
    ensure!(comm.reduce_scatter(&input_on(rank, world * 3 + 1, Kind::Float, device), ReduceOp::Sum).is_err());
    ensure!(comm.broadcast(&input_on(rank, 3, Kind::Float, device), world).is_err());
    ensure!(comm.all_reduce(&Tensor::from_slice(&[true, false]).to_device(device), ReduceOp::Sum).is_err());
    comm.barrier()?;
    Ok(checks + 3)
}
