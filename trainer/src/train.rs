//! The training loop, in the order of the paper's Algorithm 1:
//!
//! ```text
//! repeat
//!     x ~ data;  t_b ~ U[β, ω] per block;  x_t^b ~ q(· | x^b, t_b)
//!     L = Σ_b (1/t_b) · log p_θ(x^b | x_t^b, x^{<b})      (one pass over x_t ⊕ x_0)
//!     θ ← AdamW(θ, ∇L)
//! until converged
//! ```

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use checkpoint::{AsyncSaver, CheckpointStore, Manifest, Retention, SaveJob, WriteOptions};
use dataloader::{
    Batch, Gpt2Tokenizer, InMemoryLoader, LoaderState, PackedCorpus, Reader, ReaderConfig, SplitName, TextCorpus,
};
use serde_json::json;
use tch::{nn, Device, Kind, Tensor};
use tracing::info;

use crate::config::{Arch, Config};
use crate::diffusion::{ar_token_losses, tokens_tensor, BlockDiffusion, ClipInterval};
use crate::dist::{self, Communicator, ReduceOp};
use crate::eval::{self, EvalBatches, NelboReport};
use crate::model::{num_parameters, Dit};
use crate::optim::{Ema, LrSchedule};
use crate::rng::{stream, NoiseRng};
use crate::sample::{generate, SampleOptions};
use crate::state::{self, Progress, TrainState};
use crate::zero::Optimizer;

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
}

/// The loss a model is trained with: block diffusion or next-token prediction.
pub enum Objective {
    Diffusion(BlockDiffusion),
    Autoregressive { mask_id: u32 },
}

impl Objective {
    pub fn new(cfg: &Config) -> Result<Self> {
        Ok(match cfg.model.arch {
            Arch::Bd3 => Self::Diffusion(BlockDiffusion::new(&cfg.model, &cfg.diffusion)?),
            Arch::Ar => Self::Autoregressive { mask_id: cfg.diffusion.mask_id },
        })
    }

    /// Per-token losses of a micro-batch `[batch, len]` of clean tokens, with noise drawn
    /// from `rng` (`[batch, len − 1]` for the AR model, which predicts tokens 1..len).
    pub fn token_losses(
        &self,
        model: &Dit,
        tokens: &[u32],
        batch: usize,
        clip: ClipInterval,
        rng: &mut NoiseRng,
        train: bool,
    ) -> Result<Tensor> {
        self.token_losses_of_rows(model, tokens, batch, 0..batch, clip, rng, train)
    }

    /// [`Objective::token_losses`] of rows `rows` of the batch only, with the noise still drawn
    /// for the whole batch: a data-parallel rank takes its rows of the global batch, and a row's
    /// noise is the same whatever the number of ranks sharing the batch (each rank draws the
    /// whole batch's noise on the host, a small cost next to the model).
    #[allow(clippy::too_many_arguments)]
    pub fn token_losses_of_rows(
        &self,
        model: &Dit,
        tokens: &[u32],
        batch: usize,
        rows: Range<usize>,
        clip: ClipInterval,
        rng: &mut NoiseRng,
        train: bool,
    ) -> Result<Tensor> {
        let device = model.device();
        let len = tokens.len() / batch;
        let own = &tokens[rows.start * len..rows.end * len];
        match self {
            Self::Diffusion(obj) => {
                let x0 = tokens_tensor(own, rows.len(), obj.seq_len, device);
                let noise = obj.sample_noise(tokens, batch, clip, rng)?.rows(rows);
                obj.token_losses(model, &x0, &noise, train)
            }
            Self::Autoregressive { mask_id } => {
                ar_token_losses(model, &tokens_tensor(own, rows.len(), len, device), *mask_id, train)
            }
        }
    }
}

pub fn select_device(spec: &str) -> Result<Device> {
    Ok(match spec {
        "auto" => Device::cuda_if_available(),
        "cpu" => Device::Cpu,
        _ => {
            let index = match spec.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest.trim_start_matches(':').parse().with_context(|| format!("train.device {spec:?}"))?,
                None => bail!("train.device {spec:?}: expected auto, cpu or cuda[:N]"),
            };
            if !tch::Cuda::is_available() {
                bail!("train.device is {spec:?} but no CUDA device is available");
            }
            Device::Cuda(index)
        }
    })
}

/// Where training batches come from: prepared Parquet shards (`bd3 prepare`) streamed from a
/// local path or an object store, or a text corpus tokenized in memory (the demo's).
pub enum TrainData {
    Shards(Box<Reader>),
    Memory(InMemoryLoader),
}

impl TrainData {
    /// The training batches and the validation tokens of `cfg.data`. Batches hold the rows of
    /// all `world` ranks (each rank keeps its own), so the order and the saved position do not
    /// depend on the number of ranks.
    pub fn open(cfg: &Config, world: usize) -> Result<(Self, Vec<u32>)> {
        let (mb, seq_len) = (cfg.train.micro_batch, cfg.model.seq_len);
        if cfg.data.dataset.is_empty() {
            let corpus = load_corpus(cfg)?;
            let loader = InMemoryLoader::new(corpus.train, seq_len, mb * world, cfg.train.seed, true)?;
            return Ok((Self::Memory(loader), corpus.valid));
        }
        let url = &cfg.data.dataset;
        let global_batch = mb * world * cfg.train.grad_accum;
        let reader = Reader::open(url, ReaderConfig::new(cfg.train.seed, 0, 1, global_batch, mb * world))
            .with_context(|| format!("data.dataset {url}"))?;
        ensure!(
            reader.seq_len() == seq_len,
            "data.dataset {url} holds sequences of {} tokens, but model.seq_len is {seq_len}",
            reader.seq_len()
        );
        // Validation reads only what evaluation and the clip search use (all of it with
        // train.eval_batches = 0), in the split's stored order.
        let wanted = match cfg.train.eval_batches {
            0 => None,
            n => Some(n.max(cfg.diffusion.clip_search_batches) * mb),
        };
        let valid = match reader.manifest().valid.sequences {
            0 => vec![],
            _ => split_tokens(cfg, SplitName::Valid, wanted)?,
        };
        info!(
            dataset = %url,
            train_sequences = reader.num_sequences(),
            valid_sequences = valid.len() / seq_len,
            "data set opened"
        );
        Ok((Self::Shards(Box::new(reader)), valid))
    }

    pub fn next_batch(&mut self) -> Result<Batch> {
        match self {
            Self::Shards(r) => r.next_batch(),
            Self::Memory(m) => Ok(m.next_batch()),
        }
    }

    pub fn state(&self) -> LoaderState {
        match self {
            Self::Shards(r) => r.state(),
            Self::Memory(m) => m.state(),
        }
    }

    pub fn restore(&mut self, state: LoaderState) -> Result<()> {
        match self {
            Self::Shards(r) => r.restore(state),
            Self::Memory(m) => {
                m.restore(state);
                Ok(())
            }
        }
    }
}

/// The tokens of a split of `cfg.data` in stored order, at most `max_sequences` sequences (from
/// a prepared data set: whole micro-batches only).
pub fn split_tokens(cfg: &Config, split: SplitName, max_sequences: Option<usize>) -> Result<Vec<u32>> {
    let (mb, seq_len) = (cfg.train.micro_batch, cfg.model.seq_len);
    let cap = |n: usize| max_sequences.map_or(n, |m| m.min(n)) / mb * mb;
    if cfg.data.dataset.is_empty() {
        let corpus = load_corpus(cfg)?;
        let mut tokens = if split == SplitName::Train { corpus.train } else { corpus.valid };
        if let Some(m) = max_sequences {
            tokens.truncate(m * seq_len);
        }
        return Ok(tokens);
    }
    let url = &cfg.data.dataset;
    let config = ReaderConfig { split, ..ReaderConfig::validation(0, 1, mb, mb) };
    let mut reader = Reader::open(url, config).with_context(|| format!("data.dataset {url}: {split} split"))?;
    let wanted = cap(reader.num_sequences() as usize);
    let mut tokens = Vec::with_capacity(wanted * seq_len);
    while tokens.len() < wanted * seq_len {
        tokens.extend(reader.next_batch()?.tokens);
    }
    Ok(tokens)
}

/// Loads the corpus of `cfg.data`, tokenizes and packs it into `model.seq_len` sequences.
pub fn load_corpus(cfg: &Config) -> Result<PackedCorpus> {
    let started = Instant::now();
    let corpus = TextCorpus::load_dir(&cfg.data.corpus)?;
    let tokenizer = Gpt2Tokenizer::new()?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let documents = corpus.tokenize(&tokenizer, threads);
    let packed = PackedCorpus::pack(&documents, cfg.model.seq_len, cfg.data.valid_documents)
        .with_context(|| format!("packing corpus {}", cfg.data.corpus.display()))?;
    info!(
        documents = documents.len(),
        train_sequences = packed.num_train(),
        valid_sequences = packed.num_valid(),
        seconds = started.elapsed().as_secs_f64(),
        "corpus ready"
    );
    Ok(packed)
}

/// Trains as one rank of the job this process was started in (trainer::dist): a plain process
/// trains alone; under mpirun or srun, ranks split each global batch between them, average their
/// gradients, and only rank 0 writes the run directory and checkpoints.
pub fn run(cfg: &Config) -> Result<TrainOutcome> {
    cfg.validate()?;
    let dist = dist::init(cfg.dist.options())?;
    dist::catch_stop_signals()?;
    let result = run_on_device(cfg, &dist);
    if let Err(e) = &result {
        dist.abort_job(e); // peers would otherwise wait for this rank until the timeout
    }
    result
}

/// Trains on `train.device`. On several GPUs, rank r of a node drives its CUDA device r and the
/// collectives on CUDA tensors go over NCCL (feature `cuda`; not yet run on a GPU machine).
fn run_on_device(cfg: &Config, dist: &dist::Dist) -> Result<TrainOutcome> {
    let comm = dist.comm();
    let device = select_device(&cfg.train.device)?;
    if comm.world_size() == 1 || !device.is_cuda() {
        return run_in(cfg, comm, device);
    }
    #[cfg(feature = "cuda")]
    {
        let local = dist.placement.local_rank;
        let routed = dist::nccl::Routed::new(comm, local, cfg.dist.options().timeout)?;
        run_in(cfg, &routed, Device::Cuda(local))
    }
    #[cfg(not(feature = "cuda"))]
    bail!(
        "training on {} processes with CUDA tensors needs NCCL: build bd3 with the cargo feature \
         `cuda`, or train on the CPU (train.device = \"cpu\")",
        comm.world_size()
    )
}

fn run_in(cfg: &Config, comm: &dyn Communicator, device: Device) -> Result<TrainOutcome> {
    // ---- set-up: device, seeds, run directory, data, model, optimizer -------------------------
    let (rank, world) = (comm.rank(), comm.world_size());
    let lead = rank == 0; // the rank that writes
    if device == Device::Cpu {
        keep_freed_memory_for_reuse(true);
    }
    if cfg.train.threads > 0 {
        tch::set_num_threads(cfg.train.threads as i32);
    }
    // libtorch's generator drives parameter initialization here and dropout in the loop, where
    // it is re-seeded from (seed, step) every step; the diffusion noise comes from `NoiseRng`, a
    // function of (seed, step, micro-batch). So the step number is the whole RNG state, and a
    // resumed run draws exactly what an uninterrupted one would.
    tch::manual_seed(cfg.train.seed as i64);
    let autocast = cfg.train.bf16 && device.is_cuda();

    let run_dir = cfg.run_dir();
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating run directory {}", run_dir.display()))?;

    let (mb, accum, seq_len) = (cfg.train.micro_batch, cfg.train.grad_accum, cfg.model.seq_len);
    // Every rank reads the global batch of each micro-step and keeps its rows of it.
    let (mut loader, valid) = TrainData::open(cfg, world)?;
    let own_rows = rank * mb..(rank + 1) * mb;

    let vs = nn::VarStore::new(device);
    let model = Dit::new(&vs.root(), &cfg.model)?;
    let (names, mut params) = named_parameters_in_name_order(&vs);
    let objective = Objective::new(cfg)?;
    let mut clip = ClipInterval { beta: cfg.diffusion.sampling_eps_min, omega: cfg.diffusion.sampling_eps_max };
    store_clip_interval(&vs, clip);
    let mut optimizer = Optimizer::new(&params, &cfg.optim, cfg.dist.zero, rank, world)?;
    let mut ema = Ema::new(&params, cfg.optim.ema_decay);
    let schedule = LrSchedule { base: cfg.optim.lr, warmup: cfg.optim.warmup_steps };

    // ---- checkpoints: resume, then save as we go -------------------------------------------------
    let store = Arc::new(CheckpointStore::open(&cfg.checkpoint_url())?);
    let save_options = WriteOptions {
        max_file_bytes: cfg.checkpoint.max_file_mib << 20,
        attempt: job_attempt(comm)?,
        ..Default::default()
    };
    // Rank 0 first: with `auto` it removes half-written steps, which the others must not read.
    let resumed = if lead {
        let point = resume_point(cfg, &store);
        comm.barrier()?;
        point?
    } else {
        comm.barrier()?;
        resume_point(cfg, &store)?
    };
    let mut first_step = 0;
    if let Some(manifest) = &resumed {
        state::check_compatible(cfg, manifest)?;
        TrainState { vs: &vs, names: &names, optimizer: &mut optimizer, ema: &mut ema }.load(&store, manifest)?;
        if let Some(p) = state::progress_of(manifest)? {
            (first_step, optimizer.adam_mut().step, ema.updates, clip) =
                (p.step, p.optimizer_steps, p.ema_updates, p.clip());
            loader.restore(p.data)?;
        }
        store_clip_interval(&vs, clip);
        info!(step = first_step, url = store.url(), "resumed");
    }
    for p in &params {
        comm.broadcast(p, 0)?; // every rank starts from rank 0's weights
    }
    // Written only now, so that a refused resume leaves the run's config as it was.
    if lead {
        std::fs::write(run_dir.join("config.toml"), cfg.to_toml()?)?;
    }
    let mut saver = AsyncSaver::new(Arc::clone(&store));
    let mut metrics = MetricsLog::open(run_dir.join("metrics.jsonl"), resumed.is_some(), lead)?;
    info!(
        parameters = num_parameters(&vs),
        ?device,
        arch = ?cfg.model.arch,
        block_size = cfg.diffusion.block_size,
        global_batch = mb * accum * world,
        rank,
        world,
        run_dir = %run_dir.display(),
        checkpoints = store.url(),
        "training"
    );

    // ---- the loop -------------------------------------------------------------------------------
    let mut losses = Vec::with_capacity(cfg.train.steps as usize);
    let mut window_start = Instant::now();
    let mut window_tokens = 0usize;
    let mut valid_nelbo = None;
    for step in first_step..cfg.train.steps {
        saver.poll()?; // a failed background save stops the run here, one step later
                       // Ranks other than 0 draw other dropout masks (rank 0's are those of a single process).
        tch::manual_seed(step_seed(cfg.train.seed, step) ^ ((rank as i64) << 40));
        let lr = schedule.lr(step);
        for p in params.iter_mut() {
            p.zero_grad();
        }
        let mut step_loss = 0.0;
        for micro in 0..accum {
            let batch = loader.next_batch()?;
            let mut rng = NoiseRng::new(cfg.train.seed, stream::TRAIN_NOISE, step, micro as u64);
            let loss = tch::autocast(autocast, || {
                objective.token_losses_of_rows(
                    &model,
                    &batch.tokens,
                    mb * world,
                    own_rows.clone(),
                    clip,
                    &mut rng,
                    true,
                )
            })?
            .mean(Kind::Float);
            (&loss / accum as f64).backward();
            step_loss += loss.double_value(&[]) / accum as f64;
        }
        if world > 1 {
            // Every rank's loss is a mean over its rows: the global batch's is their mean.
            let loss = Tensor::from_slice(&[step_loss]);
            comm.all_reduce(&loss, ReduceOp::Avg)?;
            step_loss = loss.double_value(&[0]);
        }
        if !step_loss.is_finite() {
            bail!("step {step}: loss is {step_loss}; stopping before the weights are corrupted");
        }
        // Gradients averaged over the ranks (all-reduced, or reduce-scattered with ZeRO), clipped
        // to the global norm, one AdamW step; every rank ends with the same full weights.
        let grad_norm = optimizer.step(comm, &params, lr, cfg.optim.grad_clip, cfg.dist.bucket_bytes())?;
        if cfg.optim.ema_decay > 0.0 {
            ema.update(&params);
        }
        losses.push(step_loss);
        window_tokens += mb * accum * world * seq_len;

        // SIGTERM or SIGUSR1 on any rank: every rank ends the run after this step, as at its
        // last step (validation, checkpoint, weights), and exits 0 for the scheduler's requeue.
        let stop = dist::stop_requested(comm)?;
        let last = step + 1 == cfg.train.steps || stop;
        if (step + 1) % cfg.train.log_every == 0 || last {
            let tokens_per_s = window_tokens as f64 / window_start.elapsed().as_secs_f64();
            info!(step = step + 1, loss = step_loss, lr, grad_norm, tokens_per_s = tokens_per_s.round(), "train");
            metrics.write(json!({
                "step": step + 1, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_s, "tokens_seen": (step + 1) as usize * mb * accum * world * seq_len,
            }))?;
            (window_start, window_tokens) = (Instant::now(), 0);
        }
        // The last step always validates, so a run that ends at step N is in the same state as
        // one that goes on past N (exact resume relies on it).
        if (cfg.train.eval_every > 0 && (step + 1) % cfg.train.eval_every == 0 || last) && !valid.is_empty() {
            let outcome = with_ema(&mut ema, &params, cfg, || validation(&model, &objective, &valid, cfg))?;
            clip = report_validation(&mut metrics, &vs, step + 1, &outcome)?.unwrap_or(clip);
            valid_nelbo = Some(outcome.nelbo.nll);
            // Validation time is not training time.
            (window_start, window_tokens) = (Instant::now(), 0);
        }
        let every = cfg.checkpoint.every;
        // Every rank writes its part of the state; rank 0 commits and applies retention.
        if last || (every > 0 && (step + 1) % every == 0) {
            let progress = Progress {
                step: step + 1,
                tokens_seen: (step + 1) * (mb * accum * world * seq_len) as u64,
                optimizer_steps: optimizer.adam().step,
                ema_updates: ema.updates,
                clip_beta: clip.beta,
                clip_omega: clip.omega,
                data: loader.state(),
            };
            let train_state = TrainState { vs: &vs, names: &names, optimizer: &mut optimizer, ema: &mut ema };
            let job = SaveJob {
                step: step + 1,
                rank,
                world_size: world,
                tensors: train_state.snapshot(rank, world)?,
                meta: lead.then(|| state::checkpoint_meta(cfg, &progress)).transpose()?,
                options: save_options,
                retention: lead.then_some(Retention {
                    keep_latest: cfg.checkpoint.keep_latest,
                    keep_every: cfg.checkpoint.keep_every,
                }),
            };
            if cfg.checkpoint.async_save {
                saver.save(job)?;
            } else {
                job.run(&store)?;
            }
        }
        if stop {
            info!(step = step + 1, "stopping on request (SIGTERM or SIGUSR1)");
            break;
        }
    }
    saver.wait()?;

    // ---- end of run: EMA weights, a sample ------------------------------------------------------
    let final_valid_nelbo = valid_nelbo;
    let optimizer_state_elements = optimizer.adam().state_elements();
    if !lead {
        return Ok(TrainOutcome { run_dir, losses, final_valid_nelbo, sample: None, optimizer_state_elements });
    }
    let weights = run_dir.join("model.safetensors");
    with_ema(&mut ema, &params, cfg, || Ok(vs.save(&weights)?))?;
    info!(path = %weights.display(), "saved EMA weights");
    let sample = if cfg.train.sample_tokens > 0 {
        let opts = SampleOptions { batch: 1, ..SampleOptions::from_config(cfg, cfg.train.sample_tokens) };
        let generation = with_ema(&mut ema, &params, cfg, || generate(&model, cfg, &opts, device))?;
        let text = Gpt2Tokenizer::new()?.decode(&generation.samples[0].tokens);
        std::fs::write(run_dir.join("sample.txt"), &text)?;
        info!(nfe = generation.nfe, tokens_per_s = generation.tokens_per_s().round(), "sampled");
        Some(text)
    } else {
        None
    };
    Ok(TrainOutcome { run_dir, losses, final_valid_nelbo, sample, optimizer_state_elements })
}

/// libtorch frees and re-allocates the same large CPU buffers (logits, their gradients) every
/// step; glibc serves such sizes with fresh mmaps whose pages fault in again each time. Keeping
/// freed memory in the heap instead made CPU training 1.4× faster (docs/benchmarks.md), at the
/// price of a resident set that stays at its peak. `false` restores glibc's defaults.
pub fn keep_freed_memory_for_reuse(keep: bool) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters; it is safe to call at any time.
    unsafe {
        let (mmap_max, trim_threshold) = if keep { (0, i32::MAX) } else { (65_536, 128 * 1024) };
        libc::mallopt(libc::M_MMAP_MAX, mmap_max);
        libc::mallopt(libc::M_TRIM_THRESHOLD, trim_threshold);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = keep;
}

/// Runs `f` with the EMA weights in place (the reference evaluates and samples with them).
fn with_ema<T>(ema: &mut Ema, params: &[Tensor], cfg: &Config, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let use_ema = cfg.optim.ema_decay > 0.0;
    if use_ema {
        ema.swap(params);
    }
    let result = f();
    if use_ema {
        ema.swap(params);
    }
    result
}

/// What one validation measured.
pub struct Validation {
    pub nelbo: NelboReport,
    /// The clip search's winner and its mean per-batch variance, when it ran.
    pub clip: Option<(ClipInterval, f64)>,
}

/// Validation NELBO over the split (or its first `train.eval_batches` batches) and, for BD3-LM
/// with `diffusion.clip_search`, the clip search over its first `clip_search_batches` batches.
pub fn validation(model: &Dit, objective: &Objective, valid: &[u32], cfg: &Config) -> Result<Validation> {
    let batches = EvalBatches {
        seq_len: cfg.model.seq_len,
        micro_batch: cfg.train.micro_batch,
        max_batches: cfg.train.eval_batches,
    };
    let nelbo = eval::nelbo(model, objective, valid, batches, cfg.train.seed)?;
    let clip = match objective {
        Objective::Diffusion(obj) if cfg.diffusion.clip_search => {
            let d = &cfg.diffusion;
            let candidates = eval::clip_candidates(d.block_size, &d.clip_search_widths, d.clip_search_delta);
            let batches = EvalBatches { max_batches: d.clip_search_batches.max(1), ..batches };
            eval::clip_search(model, obj, valid, batches, candidates, cfg.train.seed)?.best()
        }
        _ => None,
    };
    Ok(Validation { nelbo, clip })
}

/// Logs a validation; a clip-search winner is written into the model's `sampling_eps_min/max`
/// buffers (saved with the weights) and returned for the following training steps.
fn report_validation(
    metrics: &mut MetricsLog,
    vs: &nn::VarStore,
    step: u64,
    v: &Validation,
) -> Result<Option<ClipInterval>> {
    let nll = v.nelbo.nll;
    info!(step, valid_nelbo = nll, valid_ppl = nll.exp(), tokens = v.nelbo.tokens, "validation");
    metrics.write(json!({ "step": step, "valid_nelbo": nll, "valid_ppl": nll.exp() }))?;
    let Some((clip, variance)) = v.clip else { return Ok(None) };
    info!(step, beta = clip.beta, omega = clip.omega, variance, "clip search");
    metrics
        .write(json!({ "step": step, "clip_beta": clip.beta, "clip_omega": clip.omega, "clip_variance": variance }))?;
    store_clip_interval(vs, clip);
    Ok(Some(clip))
}

/// Writes the interval in use into the model's `sampling_eps_min/max` buffers, which are saved
/// with the weights as in the reference's checkpoints.
fn store_clip_interval(vs: &nn::VarStore, clip: ClipInterval) {
    let vars = vs.variables();
    tch::no_grad(|| {
        for (name, value) in [("sampling_eps_min", clip.beta), ("sampling_eps_max", clip.omega)] {
            if let Some(t) = vars.get(name) {
                let _ = t.shallow_clone().fill_(value);
            }
        }
    });
}

/// Trainable parameters sorted by name: a stable order for the optimizer state and EMA.
pub fn parameters_in_name_order(vs: &nn::VarStore) -> Vec<Tensor> {
    named_parameters_in_name_order(vs).1
}

/// The names and tensors of [`parameters_in_name_order`].
pub fn named_parameters_in_name_order(vs: &nn::VarStore) -> (Vec<String>, Vec<Tensor>) {
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named.into_iter().unzip()
}

/// libtorch's seed for `step` (dropout), from the counter-based generator's own stream.
fn step_seed(seed: u64, step: u64) -> i64 {
    (NoiseRng::new(seed, stream::TORCH_SEED, step, 0).next_u64() >> 1) as i64
}

/// The checkpoint to start from, per `checkpoint.resume`. Starting fresh where committed
/// checkpoints already exist is refused: their steps would be overwritten.
/// An id shared by every rank of this job and (with overwhelming probability) by no other job:
/// rank 0's clock and process id, broadcast. Checkpoint rank indices carry it, so that rank 0
/// never commits an index an earlier job left at a step this job writes again.
fn job_attempt(comm: &dyn Communicator) -> Result<u64> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let local = (nanos as u64 ^ (u64::from(std::process::id()) << 32)) & (i64::MAX as u64);
    let id = Tensor::from_slice(&[local as i64]);
    comm.broadcast(&id, 0)?;
    Ok(id.int64_value(&[0]) as u64)
}

fn resume_point(cfg: &Config, store: &CheckpointStore) -> Result<Option<Manifest>> {
    let committed = store.committed_steps()?;
    match cfg.checkpoint.resume.as_str() {
        "none" => {
            if let Some(last) = committed.last() {
                bail!(
                    "{} already holds checkpoints up to step {last}: resume with `--resume auto` \
                     (checkpoint.resume), or choose another run.name or checkpoint.url",
                    store.url()
                );
            }
            Ok(None)
        }
        "auto" => {
            // Steps a killed writer left half-written are not checkpoints; remove what we wrote.
            store.clean_partial()?;
            let point = store.latest_valid()?;
            if point.manifest.is_none() && !point.skipped.is_empty() {
                bail!("no checkpoint in {} verifies: {:?}", store.url(), point.skipped);
            }
            // The run goes on from an earlier step and will write these steps again: they stop
            // existing, and their files go (all written by bd3, none usable), so that no stale
            // rank index can be mistaken for a new one.
            for (step, _) in &point.skipped {
                store.uncommit(*step)?;
            }
            if !point.skipped.is_empty() {
                store.clean_partial()?;
            }
            Ok(point.manifest)
        }
        step => {
            let step: u64 = step.parse().with_context(|| format!("checkpoint.resume {step:?}"))?;
            let manifest = store.manifest(step)?;
            store.verify(&manifest)?;
            Ok(Some(manifest))
        }
    }
}

/// One JSON object per line, flushed as written so a crashed run keeps its metrics.
struct MetricsLog {
    /// None on ranks other than 0, which write nothing.
    out: Option<BufWriter<File>>,
}

impl MetricsLog {
    /// A resumed run appends to the log of the run it continues.
    fn open(path: PathBuf, append: bool, enabled: bool) -> Result<Self> {
        if !enabled {
            return Ok(Self { out: None });
        }
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { out: Some(BufWriter::new(file)) })
    }

    fn write(&mut self, value: serde_json::Value) -> Result<()> {
        let Some(out) = &mut self.out else { return Ok(()) };
        serde_json::to_writer(&mut *out, &value)?;
        out.write_all(b"\n")?;
        out.flush()?;
        Ok(())
    }
}
