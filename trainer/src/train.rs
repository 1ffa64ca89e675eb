//! The training loop, in the order of the paper's Algorithm 1 (docs/algorithm.md §2):
//!
//! ```text
//! repeat
//!     x ~ data;  t_b ~ U[β, ω] per block;  x_t^b ~ q(· | x^b, t_b)
//!     L = Σ_b (1/t_b) · log p_θ(x^b | x_t^b, x^{<b})      (one pass over x_t ⊕ x_0)
//!     θ ← AdamW(θ, ∇L)
//! until converged
//! ```
//!
//! [`train`] joins the job and picks the device; [`train_loop`] is the loop; [`Trainer`] holds
//! what the loop works on and does each part of a step: [`Trainer::step`], [`Trainer::validate`],
//! [`Trainer::save`], [`Trainer::finish`].

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use checkpoint::{AsyncSaver, CheckpointStore, Retention, SaveJob, SaveReport, WriteOptions};
use indicatif::ProgressBar;
use serde_json::json;
use tch::{nn, Device, Tensor};
use tracing::info;

use crate::config::{Config, OnNonFinite};
use crate::data::TrainData;
use crate::device::{keep_freed_memory_for_reuse, rank_device};
use crate::diffusion::{ClipInterval, GlobalRows};
use crate::dist::{self, Communicator, ReduceOp};
use crate::flops::{device_peak_flops, training_flops_per_step};
use crate::metrics::MetricsLog;
use crate::model::{num_parameters, Dit};
use crate::objective::Objective;
use crate::optim::{Ema, LrSchedule};
use crate::optimizer::Optimizer;
use crate::preemption;
use crate::progress::Progress;
use crate::resume::{job_attempt, resume_point};
use crate::rng::{stream, NoiseRng};
use crate::run_stamp::{finish_progress_bar, progress_bar, RunStamp};
use crate::sample::{generate, SampleOptions};
use crate::state::{self, TrainState};
use crate::stateful::{Params, Stored};
use crate::telemetry::Telemetry;
use crate::validation::{validation, Validation};

/// Trains as one rank of the job this process was started in (trainer::dist): a plain process
/// trains alone; under mpirun or srun, ranks split each global batch between them, average their
/// gradients, and only rank 0 writes the run directory and checkpoints.
pub fn train(cfg: &Config) -> Result<TrainOutcome> {
    cfg.validate()?;
    let dist = dist::init(cfg.dist.options())?;
    preemption::catch_stop_signals()?;
    let result = train_on_device(cfg, &dist);
    if let Err(e) = &result {
        dist.abort_job(e); // peers would otherwise wait for this rank until the timeout
    }
    result
}

/// Trains on `train.device` (crate::device::rank_device). On several GPUs, local rank r of a node
/// drives its CUDA device r and the collectives on CUDA tensors go over NCCL (feature `cuda`; not
/// yet run on a GPU machine).
fn train_on_device(cfg: &Config, dist: &dist::Dist) -> Result<TrainOutcome> {
    let comm = dist.comm();
    let device = rank_device(cfg.train.device, &dist.placement, tch::Cuda::device_count().max(0) as usize)?;
    let local = dist.placement.local_rank;
    // Before anything heavy: a port in use is a clear error at start.
    let telemetry = Telemetry::start(&cfg.metrics.listen, &cfg.run.name, comm.rank(), local, device.is_cuda())?;
    if comm.world_size() == 1 || !device.is_cuda() {
        return train_loop(cfg, comm, device, telemetry);
    }
    #[cfg(feature = "cuda")]
    {
        let routed = dist::nccl::Routed::new(comm, local, cfg.dist.options().timeout)?;
        train_loop(cfg, &routed, Device::Cuda(local), telemetry)
    }
    #[cfg(not(feature = "cuda"))]
    bail!(
        "training on {} processes with CUDA tensors needs NCCL: build bd3 with the cargo feature \
         `cuda`, or train on the CPU (train.device = \"cpu\")",
        comm.world_size()
    )
}

/// The loop: from the step a checkpoint left off at (or 0) to `train.steps`, or to the step at
/// which any rank was asked to stop. Live metrics go to `telemetry` too.
pub fn train_loop(cfg: &Config, comm: &dyn Communicator, device: Device, telemetry: Telemetry) -> Result<TrainOutcome> {
    let mut trainer = Trainer::new(cfg, comm, device, telemetry)?;
    for step in trainer.first_step..cfg.train.steps {
        let stats = trainer.step(step)?;
        // Steps completed (skipped ones included).
        let done = step + 1;
        trainer.observe(done, &stats);
        // SIGTERM or SIGUSR1 on any rank: every rank ends the run after this step with a
        // checkpoint and the weights, and exits 0 for the scheduler's requeue.
        let stop = preemption::stop_requested(comm)?;
        let last = done == cfg.train.steps || stop;
        if done % cfg.train.log_every == 0 || last {
            trainer.log(done, &stats)?;
        }
        // Validation on its schedule and at the end of the run, not at a stop on request: its
        // clip search would change the interval that the resumed run trains with, and a run
        // stopped and resumed must train exactly as one that was never stopped.
        if cfg.train.eval_every > 0 && done % cfg.train.eval_every == 0 || done == cfg.train.steps {
            trainer.validate(done)?;
        }
        let every = cfg.checkpoint.every;
        if last || (every > 0 && done % every == 0) {
            trainer.save(done)?;
        }
        if stop {
            info!(step = done, "stopping on request (SIGTERM or SIGUSR1)");
            break;
        }
    }
    trainer.finish()
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub run_dir: PathBuf,
    /// Mean training loss of every step.
    pub losses: Vec<f64>,
    /// Validation NELBO (nats per token) with the EMA weights at the end.
    pub final_valid_nelbo: Option<f64>,
    /// Text generated with the EMA weights at the end, if asked for.
    pub sample: Option<String>,
    /// Elements of AdamW moments this rank held (a 1/world share of all with `dist.zero`).
    pub optimizer_state_elements: usize,
    /// Bytes of row groups this rank read from the data set (about 1/world of one rank's).
    pub data_bytes_read: u64,
    /// Steps whose gradient reduction overlapped backward (`dist.overlap`).
    pub overlapped_steps: u64,
}

/// What one training step measured.
pub struct StepStats {
    /// Mean loss over the global batch.
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The weights were not updated (`train.on_nonfinite = "skip"`).
    pub skipped: bool,
    /// Wall-clock seconds of the whole step, of waiting for batches, and of reducing the
    /// gradients across ranks.
    pub seconds: f64,
    pub data_wait_seconds: f64,
    pub reduce_seconds: f64,
}

/// What is wrong with a step whose loss or gradient norm is not finite, or whose loss is above
/// `max_loss`; `None` for a healthy step.
pub fn divergence(loss: f64, grad_norm: f64, max_loss: Option<f64>) -> Option<String> {
    if !loss.is_finite() {
        Some(format!("the loss is {loss}"))
    } else if !grad_norm.is_finite() {
        Some(format!("the gradient norm is {grad_norm} (loss {loss})"))
    } else {
        max_loss.filter(|&max| loss > max).map(|max| format!("the loss {loss} is above train.max_loss ({max})"))
    }
}

/// Everything the loop works on, built once from the config, the communicator and the device.
pub struct Trainer<'a> {
    cfg: &'a Config,
    comm: &'a dyn Communicator,
    device: Device,
    run_dir: PathBuf,
    model: Dit,
    objective: Objective,
    /// Model, EMA, optimizer and progress: what a checkpoint holds.
    state: TrainState,
    schedule: LrSchedule,
    data: TrainData,
    valid: Vec<u32>,
    store: Arc<CheckpointStore>,
    saver: AsyncSaver,
    save_options: WriteOptions,
    metrics: MetricsLog,
    telemetry: Telemetry,
    /// Model FLOPs of one step of the whole job (crate::flops), and this rank's device peak.
    flops_per_step: f64,
    peak_flops: Option<f64>,
    /// A progress bar on rank 0 when stderr is a terminal (log lines otherwise).
    bar: Option<ProgressBar>,
    /// The first step this process trains (after a resume, the checkpoint's).
    pub first_step: u64,
    losses: Vec<f64>,
    valid_nelbo: Option<f64>,
    /// Steps skipped as diverged (`train.on_nonfinite = "skip"`): in a row, and in this process.
    consecutive_skips: u64,
    skipped_steps: u64,
    /// Tokens trained on since `window_start` (tokens/s in the step log).
    window_start: Instant,
    window_tokens: usize,
}

impl<'a> Trainer<'a> {
    /// Sets up the run: seeds, run directory, data, model, optimizer, EMA, and the state of the
    /// checkpoint `checkpoint.resume` names.
    pub fn new(cfg: &'a Config, comm: &'a dyn Communicator, device: Device, telemetry: Telemetry) -> Result<Self> {
        let lead = comm.rank() == 0; // the rank that writes
        if device == Device::Cpu {
            keep_freed_memory_for_reuse(true);
        }
        if cfg.train.threads > 0 {
            tch::set_num_threads(cfg.train.threads as i32);
        }
        // libtorch's generator drives parameter initialization here and dropout in the loop,
        // where it is re-seeded from (seed, step) every step; the diffusion noise comes from
        // `NoiseRng`, a function of (seed, step, global row). So the step number is the whole
        // RNG state, and a resumed run draws exactly what an uninterrupted one would.
        tch::manual_seed(cfg.train.seed as i64);
        let run_dir = cfg.run_dir();
        std::fs::create_dir_all(&run_dir).with_context(|| format!("creating run directory {}", run_dir.display()))?;
        // Each rank reads only its rows of every global batch.
        let (data, valid) = TrainData::open(cfg, comm.rank(), comm.world_size())?;

        let mut vs = nn::VarStore::new(device);
        let model = Dit::build(&mut vs, &cfg.model)?;
        let params = Params::of(&vs);
        let objective = Objective::new(cfg)?;
        let clip = ClipInterval { beta: cfg.diffusion.sampling_eps_min, omega: cfg.diffusion.sampling_eps_max };
        let (rank, world, bucket_bytes) = (comm.rank(), comm.world_size(), cfg.dist.bucket_bytes());
        let optimizer = Optimizer::new(&params.tensors, &cfg.optim, cfg.dist.zero, rank, world, bucket_bytes)?;
        let ema = Ema::new(&params.tensors, cfg.optim.ema_decay);
        let progress = Progress {
            step: 0,
            tokens_seen: 0,
            optimizer_steps: 0,
            ema_updates: 0,
            clip_beta: clip.beta,
            clip_omega: clip.omega,
            data: data.state(),
        };
        let state = TrainState { vs, params, optimizer, ema, progress };

        let store = Arc::new(CheckpointStore::open(&cfg.checkpoint_url())?);
        let save_options = WriteOptions {
            max_file_bytes: cfg.checkpoint.max_file_mib << 20,
            attempt: job_attempt(comm)?,
            ..Default::default()
        };
        let mut trainer = Self {
            cfg,
            comm,
            device,
            run_dir,
            model,
            objective,
            state,
            schedule: LrSchedule { base: cfg.optim.lr, warmup: cfg.optim.warmup_steps },
            data,
            valid,
            saver: AsyncSaver::new(Arc::clone(&store)),
            store,
            save_options,
            metrics: MetricsLog::disabled(),
            telemetry,
            flops_per_step: training_flops_per_step(cfg, comm.world_size())?,
            peak_flops: device_peak_flops(cfg.metrics.peak_tflops, device),
            bar: None,
            first_step: 0,
            losses: Vec::with_capacity(cfg.train.steps as usize),
            valid_nelbo: None,
            consecutive_skips: 0,
            skipped_steps: 0,
            window_start: Instant::now(),
            window_tokens: 0,
        };
        let resumed = trainer.resume()?;
        for p in &trainer.state.params.tensors {
            comm.broadcast(p, 0)?; // every rank starts from rank 0's weights
        }
        // Written only now, so that a refused resume leaves the run's config as it was.
        if lead {
            let recorded = crate::data::recorded_config(cfg, &trainer.run_dir)?;
            std::fs::write(trainer.run_dir.join("config.toml"), recorded.to_toml()?)?;
        }
        let resumed_at = resumed.then_some(trainer.first_step);
        trainer.metrics = MetricsLog::open(trainer.run_dir.join("metrics.jsonl"), resumed_at, lead)?;
        let (mb, accum) = (cfg.train.micro_batch, cfg.train.grad_accum);
        info!(
            parameters = num_parameters(&trainer.state.vs),
            ?device,
            arch = ?cfg.model.arch,
            block_size = cfg.diffusion.block_size,
            global_batch = mb * accum * comm.world_size(),
            rank = comm.rank(),
            world = comm.world_size(),
            run_dir = %trainer.run_dir.display(),
            checkpoints = trainer.store.url(),
            "training"
        );
        // Every rank takes part: the host names are gathered.
        let stamp = RunStamp::collect(cfg, comm, device)?;
        if lead {
            stamp.write(&trainer.run_dir)?;
        }
        trainer.bar =
            (lead && std::io::stderr().is_terminal()).then(|| progress_bar(cfg.train.steps, trainer.first_step));
        trainer.window_start = Instant::now();
        Ok(trainer)
    }

    /// Loads the checkpoint `checkpoint.resume` names, if any; whether one was loaded.
    fn resume(&mut self) -> Result<bool> {
        let (cfg, comm) = (self.cfg, self.comm);
        self.set_clip(self.state.progress.clip());
        // Rank 0 first: with `auto` it removes half-written steps, which the others must not read.
        let manifest = if comm.rank() == 0 {
            let point = resume_point(cfg.checkpoint.resume, &self.store);
            comm.barrier()?;
            point?
        } else {
            comm.barrier()?;
            resume_point(cfg.checkpoint.resume, &self.store)?
        };
        let Some(manifest) = manifest else {
            // No checkpoint of this run: a second stage starts from the first one's weights.
            if let Some(source) = &cfg.train.init_from {
                let loaded = crate::init::init_from(source, cfg, &mut self.state)?;
                self.set_clip(self.state.progress.clip());
                info!(from = %loaded, "initialized the weights; optimizer, EMA, step and data order start fresh");
            }
            return Ok(false);
        };
        if let Some(source) = &cfg.train.init_from {
            info!(init_from = %source, "this run has a checkpoint: resuming it, train.init_from is not used");
        }
        state::check_compatible(cfg, &manifest)?;
        let stored = Stored { store: &self.store, manifest: &manifest };
        let had_progress = stored.progress()?.is_some();
        self.state.load(&stored)?;
        if had_progress {
            self.first_step = self.state.progress.step;
            self.data.restore(self.state.progress.data)?;
        }
        self.set_clip(self.state.progress.clip());
        info!(step = self.first_step, url = self.store.url(), "resumed");
        Ok(true)
    }

    /// One optimizer step: the losses of `train.grad_accum` micro-batches of this rank's rows,
    /// backward, gradients averaged over the ranks and clipped, AdamW, EMA.
    pub fn step(&mut self, step: u64) -> Result<StepStats> {
        let (cfg, comm) = (self.cfg, self.comm);
        let (rank, world) = (comm.rank(), comm.world_size());
        let (mb, accum) = (cfg.train.micro_batch, cfg.train.grad_accum);
        let started = Instant::now();
        // A failed background save stops the run here, one step later.
        if let Some(report) = self.saver.poll()? {
            self.record_save(report);
        }
        // Ranks other than 0 draw other dropout masks (rank 0's are those of a single process).
        tch::manual_seed(step_seed(cfg.train.seed, step) ^ ((rank as i64) << 40));
        let lr = self.schedule.lr(step);
        for p in self.state.params.tensors.iter_mut() {
            p.zero_grad();
        }
        let clip = self.state.progress.clip();
        let autocast = cfg.train.bf16 && self.device.is_cuda();
        let mut loss_sum = 0.0;
        let waited = Instant::now();
        let batches = (0..accum).map(|_| self.data.next_batch()).collect::<Result<Vec<_>>>()?;
        let data_wait_seconds = waited.elapsed().as_secs_f64();
        // With padding (data prepared with --framing pad) the loss is the mean over the global
        // batch's non-padding positions, whose number only all the ranks together know: each
        // micro-batch's sum is scaled so that averaging over micro-steps and ranks gives it.
        let padded_scale = match self.objective.pad_id {
            None => None,
            Some(_) => {
                let local: usize = batches.iter().map(|b| self.objective.counted_terms(&b.tokens, mb, false)).sum();
                let mut counted = [local as f64];
                if world > 1 {
                    let t = Tensor::from_slice(&counted);
                    comm.all_reduce(&t, ReduceOp::Sum)?;
                    counted[0] = t.double_value(&[0]);
                }
                Some((accum * world) as f64 / counted[0].max(1.0))
            }
        };
        for (micro, batch) in batches.iter().enumerate() {
            // This rank's rows of the global batch: the data reader's slice rule.
            let rows = GlobalRows {
                seed: cfg.train.seed,
                step,
                global: mb * accum * world,
                first: (rank * accum + micro) * mb,
            };
            let terms = tch::autocast(autocast, || {
                self.objective.token_losses_of_rows(&self.model, &batch.tokens, mb, &rows, clip)
            })?;
            let loss = match padded_scale {
                None => terms.mean(terms.kind()),
                Some(scale) => terms.sum(terms.kind()) * scale,
            };
            let scaled = &loss / accum as f64;
            if micro + 1 == accum {
                // Gradients are reduced across ranks only now, overlapped with this backward.
                let params = &self.state.params.tensors;
                self.state.optimizer.backward_last(comm, params, &scaled, cfg.dist.overlap)?;
            } else {
                scaled.backward();
            }
            loss_sum += loss.double_value(&[]) / accum as f64;
        }
        let mut loss = loss_sum;
        if world > 1 {
            // Every rank's loss is a mean over its rows: the global batch's is their mean.
            let t = Tensor::from_slice(&[loss]);
            comm.all_reduce(&t, ReduceOp::Avg)?;
            loss = t.double_value(&[0]);
        }
        // Gradients averaged over the ranks (all-reduced, or reduce-scattered with ZeRO) and
        // clipped to the global norm; the loss and the norm are the same on every rank, so all
        // ranks agree on whether this step updates the weights.
        let params = &self.state.params.tensors;
        let bucket_bytes = cfg.dist.bucket_bytes();
        let reducing = Instant::now();
        let grad_norm = self.state.optimizer.reduce_gradients(comm, params, cfg.optim.grad_clip, bucket_bytes)?;
        let reduce_seconds = reducing.elapsed().as_secs_f64();
        self.losses.push(loss);
        self.window_tokens += self.tokens_per_step();
        let skipped = match divergence(loss, grad_norm, cfg.train.max_loss) {
            Some(problem) => {
                self.skip_step(step, &problem)?;
                true
            }
            None => {
                self.consecutive_skips = 0;
                // One AdamW step; every rank ends with the same full weights.
                let params = &self.state.params.tensors;
                self.state.optimizer.apply(comm, params, lr)?;
                if cfg.optim.ema_decay > 0.0 {
                    self.state.ema.update(params);
                }
                false
            }
        };
        let seconds = started.elapsed().as_secs_f64();
        Ok(StepStats { loss, lr, grad_norm, skipped, seconds, data_wait_seconds, reduce_seconds })
    }

    /// A step whose loss or gradient norm says training diverged: per `train.on_nonfinite`, the
    /// run stops (no weight has changed in this step), or the step is skipped, up to
    /// `train.max_consecutive_skips` in a row.
    fn skip_step(&mut self, step: u64, problem: &str) -> Result<()> {
        let t = &self.cfg.train;
        if t.on_nonfinite == OnNonFinite::Stop {
            bail!(
                "step {}: {problem}; stopping before the optimizer step, so no weight was changed \
                 (train.on_nonfinite = \"skip\" skips such steps instead; a lower optim.lr or \
                 optim.grad_clip may help)",
                step + 1
            );
        }
        self.consecutive_skips += 1;
        self.skipped_steps += 1;
        self.telemetry.skipped_steps.inc();
        tracing::warn!(
            step = step + 1,
            consecutive = self.consecutive_skips,
            skipped = self.skipped_steps,
            "{problem}: step skipped (train.on_nonfinite = \"skip\")"
        );
        ensure!(
            self.consecutive_skips < t.max_consecutive_skips,
            "step {}: {problem}, and {} steps in a row were skipped (train.max_consecutive_skips): \
             training has diverged; stopping",
            step + 1,
            self.consecutive_skips
        );
        Ok(())
    }

    /// Sets the live gauges after step `done`; every step, on every rank.
    pub fn observe(&mut self, done: u64, stats: &StepStats) {
        let t = &self.telemetry;
        t.step.set(done as i64);
        t.loss.set(stats.loss);
        t.learning_rate.set(stats.lr);
        t.grad_norm.set(stats.grad_norm);
        t.step_seconds.set(stats.seconds);
        t.data_wait_seconds.set(stats.data_wait_seconds);
        t.allreduce_seconds.set(stats.reduce_seconds);
        t.tokens.inc_by(self.tokens_per_step() as u64);
        if let Some(bar) = &self.bar {
            bar.set_position(done);
        }
    }

    /// Logs step `done` (optimizer steps completed) with the throughput and MFU since the last
    /// log.
    pub fn log(&mut self, done: u64, stats: &StepStats) -> Result<()> {
        let seconds = self.window_start.elapsed().as_secs_f64();
        let tokens_per_s = self.window_tokens as f64 / seconds;
        // Model FLOPs per second of this rank (crate::flops), and MFU against its device's peak.
        let steps = self.window_tokens as f64 / self.tokens_per_step() as f64;
        let flops_per_s = self.flops_per_step * steps / seconds / self.comm.world_size() as f64;
        let mfu = self.peak_flops.map(|peak| flops_per_s / peak);
        let StepStats { loss, lr, grad_norm, seconds: step_time_s, reduce_seconds, .. } = *stats;
        match &self.bar {
            Some(bar) => bar.set_message(format!(
                "loss {loss:.4}  {:.0} tok/s{}",
                tokens_per_s,
                mfu.map(|u| format!("  MFU {:.1}%", 100.0 * u)).unwrap_or_default()
            )),
            None => info!(step = done, loss, lr, grad_norm, tokens_per_s = tokens_per_s.round(), mfu, "train"),
        }
        let tokens_seen = done as usize * self.tokens_per_step();
        self.metrics.write(json!({
            "step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s, "tokens_seen": tokens_seen, "step_time_s": step_time_s,
            "reduce_time_s": reduce_seconds,
            "model_flops_per_s": flops_per_s, "mfu": mfu,
        }))?;
        self.telemetry.tokens_per_second.set(tokens_per_s);
        self.telemetry.model_flops_per_second.set(flops_per_s);
        self.telemetry.mfu.set(mfu.unwrap_or(0.0));
        (self.window_start, self.window_tokens) = (Instant::now(), 0);
        Ok(())
    }

    /// Validation with the EMA weights after `done` steps: NELBO and, when enabled, the clip
    /// search, whose winner the following steps train with.
    pub fn validate(&mut self, done: u64) -> Result<()> {
        if self.valid.is_empty() {
            return Ok(());
        }
        let (model, objective, valid, cfg, comm) = (&self.model, &self.objective, &self.valid, self.cfg, self.comm);
        let TrainState { params, ema, .. } = &mut self.state;
        let outcome = ema.swapped_in(&params.tensors, || validation(model, objective, valid, cfg, comm))?;
        let Validation { nelbo, clip } = outcome;
        let nll = nelbo.nll;
        info!(step = done, valid_nelbo = nll, valid_ppl = nll.exp(), tokens = nelbo.tokens, "validation");
        self.metrics.write(json!({ "step": done, "valid_nelbo": nll, "valid_ppl": nll.exp() }))?;
        self.telemetry.valid_nelbo.set(nll);
        if let Some((clip, variance)) = clip {
            info!(step = done, beta = clip.beta, omega = clip.omega, variance, "clip search");
            self.metrics.write(json!({
                "step": done, "clip_beta": clip.beta, "clip_omega": clip.omega, "clip_variance": variance,
            }))?;
            self.set_clip(clip);
        }
        self.valid_nelbo = Some(nll);
        // Validation time is not training time.
        (self.window_start, self.window_tokens) = (Instant::now(), 0);
        Ok(())
    }

    /// Checkpoints the state after `done` steps: every rank writes its part, rank 0 commits and
    /// applies retention (in the background with `checkpoint.async_save`).
    pub fn save(&mut self, done: u64) -> Result<()> {
        let (cfg, comm) = (self.cfg, self.comm);
        let (rank, world, lead) = (comm.rank(), comm.world_size(), comm.rank() == 0);
        let tokens_seen = done * self.tokens_per_step() as u64;
        let progress = &mut self.state.progress;
        progress.step = done;
        progress.tokens_seen = tokens_seen;
        progress.optimizer_steps = self.state.optimizer.adam().step;
        progress.ema_updates = self.state.ema.updates;
        progress.data = self.data.state();
        let snapshot_started = Instant::now();
        let (tensors, values) = self.state.snapshot(rank, world)?;
        self.telemetry.checkpoint_snapshot_seconds.set(snapshot_started.elapsed().as_secs_f64());
        let job = SaveJob {
            step: done,
            rank,
            world_size: world,
            tensors,
            meta: lead.then(|| state::checkpoint_meta(cfg, tokens_seen, values)).transpose()?,
            options: self.save_options,
            retention: lead.then_some(Retention {
                keep_latest: cfg.checkpoint.keep_latest,
                keep_every: cfg.checkpoint.keep_every,
            }),
        };
        if cfg.checkpoint.async_save {
            // The previous save, which `save` waits for, is reported at the next poll instead.
            if let Some(report) = self.saver.wait()? {
                self.record_save(report);
            }
            self.saver.save(job)
        } else {
            let report = job.run(&self.store)?;
            self.record_save(report);
            Ok(())
        }
    }

    fn record_save(&self, report: SaveReport) {
        let t = &self.telemetry;
        t.checkpoint_write_seconds.set(report.seconds);
        t.checkpoint_bytes.set(report.bytes as i64);
        t.checkpoint_step.set(report.step as i64);
    }

    /// Ends the run: waits for the last save; rank 0 writes the EMA weights and, if asked for,
    /// a sample generated with them.
    pub fn finish(mut self) -> Result<TrainOutcome> {
        if let Some(report) = self.saver.wait()? {
            self.record_save(report);
        }
        if let Some(bar) = self.bar.take() {
            finish_progress_bar(bar);
        }
        let optimizer_state_elements = self.state.optimizer.adam().state_elements();
        let data_bytes_read = self.data.row_group_bytes_read();
        let overlapped_steps = self.state.optimizer.overlapped_steps();
        if data_bytes_read > 0 {
            info!(rank = self.comm.rank(), bytes = data_bytes_read, "row groups read from the data set");
        }
        let (run_dir, losses, final_valid_nelbo) =
            (self.run_dir.clone(), std::mem::take(&mut self.losses), self.valid_nelbo);
        let outcome = |sample| TrainOutcome {
            run_dir,
            losses,
            final_valid_nelbo,
            sample,
            optimizer_state_elements,
            data_bytes_read,
            overlapped_steps,
        };
        if self.comm.rank() != 0 {
            return Ok(outcome(None));
        }
        let cfg = self.cfg;
        let weights = self.run_dir.join("model.safetensors");
        let TrainState { vs, params, ema, .. } = &mut self.state;
        ema.swapped_in(&params.tensors, || Ok(vs.save(&weights)?))?;
        info!(path = %weights.display(), "saved EMA weights");
        let sample = if cfg.train.sample_tokens > 0 {
            let opts = SampleOptions { batch: 1, ..SampleOptions::for_run(cfg, cfg.train.sample_tokens)? };
            let (model, device) = (&self.model, self.device);
            let generation = ema.swapped_in(&params.tensors, || generate(model, cfg, &opts, device))?;
            let text = crate::data::sample_tokenizer(cfg)?.decode(&generation.samples[0].tokens);
            std::fs::write(self.run_dir.join("sample.txt"), &text)?;
            info!(nfe = generation.nfe, tokens_per_s = generation.tokens_per_s().round(), "sampled");
            Some(text)
        } else {
            None
        };
        Ok(outcome(sample))
    }

    /// Tokens of one global batch: micro-batch × accumulation × ranks × sequence length.
    fn tokens_per_step(&self) -> usize {
        let t = &self.cfg.train;
        t.micro_batch * t.grad_accum * self.comm.world_size() * self.cfg.model.seq_len
    }

    /// Trains with `clip` from now on, and writes it into the model's `sampling_eps_min/max`
    /// buffers, which are saved with the weights as in the published checkpoints.
    fn set_clip(&mut self, clip: ClipInterval) {
        (self.state.progress.clip_beta, self.state.progress.clip_omega) = (clip.beta, clip.omega);
        self.telemetry.clip_beta.set(clip.beta);
        self.telemetry.clip_omega.set(clip.omega);
        let vars = self.state.vs.variables();
        tch::no_grad(|| {
            for (name, value) in [("sampling_eps_min", clip.beta), ("sampling_eps_max", clip.omega)] {
                if let Some(t) = vars.get(name) {
                    let _ = t.shallow_clone().fill_(value);
                }
            }
        });
    }
}

/// libtorch's seed for `step` (dropout), from the counter-based generator's own stream.
fn step_seed(seed: u64, step: u64) -> i64 {
    (NoiseRng::new(seed, stream::TORCH_SEED, step, 0).next_u64() >> 1) as i64
}
