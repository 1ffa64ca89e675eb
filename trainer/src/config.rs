//! The run configuration: one tree of serde structs read from TOML, with `--set a.b=c`
//! overrides. Unknown keys are errors that name the key; every section has defaults taken from
//! the paper's recipe (docs/algorithm.md §1.1, §4.2, §8), so a config file only states what differs.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub run: RunConfig,
    #[serde(default)]
    pub model: ModelConfig,
    #[serde(default)]
    pub diffusion: DiffusionConfig,
    #[serde(default)]
    pub data: DataConfig,
    #[serde(default)]
    pub optim: OptimConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub sample: SampleConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub dist: DistConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// The run directory is `<dir>/<name>`.
    pub name: String,
    pub dir: PathBuf,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self { name: "default".into(), dir: "runs".into() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Block diffusion (BD3-LM; block_size = seq_len is MDLM).
    Bd3,
    /// The autoregressive baseline: causal attention, no adaLN, next-token loss (docs/algorithm.md §1.8).
    Ar,
}

/// The DiT backbone (docs/algorithm.md §1.1). Defaults are the paper's `small` model on GPT-2's vocabulary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub cond_dim: usize,
    pub mlp_ratio: usize,
    pub dropout: f64,
    /// Model vocabulary including `[MASK]` (GPT-2: 50257 + 1).
    pub vocab_size: usize,
    /// Training context L.
    pub seq_len: usize,
    /// Off for BD3-LM and MDLM (docs/algorithm.md §1.3): the conditioning vector is then a learned constant.
    pub time_conditioning: bool,
    /// Attention implementation: "auto" (per device, the fastest `docs/benchmarks.md` records),
    /// "fused" (tensor-core kernels, CUDA builds), "sdpa-tiles" (SDPA over non-empty tiles) or
    /// "dense" (SDPA with the full mask, the reference). All compute the same function.
    pub attention: kernels::Backend,
    /// The parameters' dtype, and so the activations' and the optimizer state's: "float32", or
    /// "float64" for numerical checks on CPU, where summing in another order (other ranks, other
    /// batch splits, another CPU's GEMM kernels) changes results by about 1e-16 instead of 1e-7.
    /// bf16 compute on CUDA is `train.bf16` (autocast), which leaves float64 alone.
    pub dtype: ParamDtype,
}

/// `model.dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamDtype {
    #[default]
    Float32,
    Float64,
}

impl ParamDtype {
    pub fn kind(self) -> tch::Kind {
        match self {
            Self::Float32 => tch::Kind::Float,
            Self::Float64 => tch::Kind::Double,
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self::small()
    }
}

impl ModelConfig {
    /// The paper's model: 12 layers × 768 × 12 heads, cond 128, context 1024.
    pub fn small() -> Self {
        Self {
            arch: Arch::Bd3,
            hidden: 768,
            layers: 12,
            heads: 12,
            cond_dim: 128,
            mlp_ratio: 4,
            dropout: 0.1,
            vocab_size: 50258,
            seq_len: 1024,
            time_conditioning: false,
            attention: kernels::Backend::Auto,
            dtype: ParamDtype::Float32,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

/// The lowest masking rate of the unclipped schedule t ∈ [1e-3, 1] (docs/algorithm.md §3.3): the default
/// `diffusion.sampling_eps_min`, and the lower end of the interval likelihoods are reported on.
pub const MIN_MASK_RATE: f64 = 1e-3;

/// The block-diffusion objective (docs/algorithm.md §2–§3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiffusionConfig {
    /// Block size L′; L′ = seq_len is MDLM, L′ = 1 is AR with a [MASK] query.
    pub block_size: usize,
    pub mask_id: u32,
    /// β: lower end of the masking-rate interval.
    pub sampling_eps_min: f64,
    /// ω: upper end of the masking-rate interval.
    pub sampling_eps_max: f64,
    /// One stratified draw of t per (sequence, block) over the whole batch (docs/algorithm.md §3.3).
    pub antithetic: bool,
    /// Re-noise blocks whose masked fraction leaves [β, ω] (docs/algorithm.md §3.4).
    pub resample: bool,
    /// Keep the first token of every sequence clean (docs/algorithm.md §3.5).
    pub ignore_bos: bool,
    /// At every validation, pick the clip interval [β, ω] that minimizes the variance of the
    /// per-block losses (docs/algorithm.md §4.2) and train with it from then on.
    pub clip_search: bool,
    pub clip_search_widths: Vec<f64>,
    pub clip_search_delta: f64,
    /// Validation batches the search uses.
    pub clip_search_batches: usize,
}

impl Default for DiffusionConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            mask_id: 50257,
            sampling_eps_min: MIN_MASK_RATE,
            sampling_eps_max: 1.0,
            antithetic: true,
            resample: true,
            ignore_bos: true,
            clip_search: true,
            clip_search_widths: vec![0.5, 0.6, 0.7, 0.8, 0.9],
            clip_search_delta: 0.05,
            clip_search_batches: 100,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// A tokenized data set written by `bd3 prepare`: the URL of its directory or `index.json`
    /// (local path, `s3://…`, …). Empty: tokenize `corpus` in memory instead.
    pub dataset: String,
    /// Directory of `.txt` documents, tokenized in memory when no `dataset` is given (the demo
    /// corpus is installed by scripts/setup.sh).
    pub corpus: PathBuf,
    /// With `corpus`: the last documents (by file name) held out for validation.
    pub valid_documents: usize,
    /// The id every generated sequence starts with. Unset: the data set's (`special_ids` of its
    /// `index.json`), or GPT-2's `<|endoftext|>` (50256) without a data set.
    pub bos_id: Option<u32>,
    /// The id that ends a variable-length sample; unset as `bos_id`.
    pub eos_id: Option<u32>,
    /// The tokenizer that decodes samples: "" for the data set's (GPT-2 BPE, or the
    /// `tokenizer.json` its `index.json` names; GPT-2 without a data set), "gpt2", or the path of
    /// a `tokenizer.json`. A run records the one it trained with in its `config.toml` (with the
    /// BOS/EOS ids), so that sampling from it needs no data set.
    pub tokenizer: String,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dataset: String::new(),
            corpus: "data/shakespeare".into(),
            valid_documents: 2,
            bos_id: None,
            eos_id: None,
            tokenizer: String::new(),
        }
    }
}

/// AdamW, LR schedule, clipping and EMA (docs/algorithm.md §8).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Linear warm-up steps, then constant.
    pub warmup_steps: u64,
    /// Global gradient-norm clip (0 disables).
    pub grad_clip: f64,
    /// EMA decay (0 disables the EMA).
    pub ema_decay: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 3e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            warmup_steps: 2500,
            grad_clip: 1.0,
            ema_decay: 0.9999,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: u64,
    pub micro_batch: usize,
    pub grad_accum: usize,
    pub seed: u64,
    /// "auto" (CUDA when available), "cpu" or "cuda" / "cuda:N".
    pub device: DeviceSpec,
    /// bf16 autocast on CUDA (LayerNorm and the loss stay in fp32).
    pub bf16: bool,
    /// CPU threads for libtorch (0 = all cores).
    pub threads: usize,
    pub log_every: u64,
    /// Validation NELBO every this many steps (0 = only at the end).
    pub eval_every: u64,
    /// Validation batches per evaluation (0 = the whole split).
    pub eval_batches: usize,
    /// Tokens generated with the EMA weights at the end of training (0 = none).
    pub sample_tokens: usize,
    /// What a step whose loss or gradient norm is not finite (or whose loss exceeds `max_loss`)
    /// does: "stop" the run with a diagnosis, or "skip" the step (no update) and go on.
    pub on_nonfinite: OnNonFinite,
    /// With "skip": this many skipped steps in a row stop the run.
    pub max_consecutive_skips: u64,
    /// A loss above this counts as divergence, like a non-finite one (unset: no limit).
    pub max_loss: Option<f64>,
    /// Start from another run's weights (`--init-from`): a checkpoint location (its newest
    /// committed step, or a `…/step-NNNNNNNNNN` directory) or a `.safetensors` file. The
    /// optimizer, step, data order and EMA start fresh and the clip interval is
    /// `diffusion.sampling_eps_min/max` (docs/algorithm.md §8, two stages). A checkpoint of this
    /// run found by `checkpoint.resume` wins: a preempted run resumes instead (trainer::init).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_from: Option<String>,
}

/// `train.on_nonfinite`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnNonFinite {
    Stop,
    Skip,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            micro_batch: 16,
            grad_accum: 1,
            seed: 1,
            device: DeviceSpec::Auto,
            bf16: true,
            threads: 0,
            log_every: 10,
            eval_every: 0,
            eval_batches: 0,
            sample_tokens: 0,
            on_nonfinite: OnNonFinite::Stop,
            max_consecutive_skips: 10,
            max_loss: None,
            init_from: None,
        }
    }
}

/// Generation (docs/algorithm.md §5); `bd3 sample` and the end-of-training sample read it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SampleConfig {
    /// "first_hitting" (one masked position per network call) or "ancestral".
    pub algorithm: Algorithm,
    /// T, the ancestral sampler's steps per block.
    pub steps: usize,
    /// Nucleus (top-p) mass; 1 disables the filter.
    pub nucleus_p: f64,
    /// "standard" (keeps the token that crosses p) or "reference" (drops it, docs/algorithm.md §5.4).
    pub nucleus_rule: NucleusRule,
    pub temperature: f64,
    /// Cache the keys/values of committed blocks (off: recompute the window every call).
    pub kv_cache: bool,
    /// Stop at the first generated EOS or when the last 256 tokens' entropy is below 4 nats.
    pub var_length: bool,
    /// Sequences generated together.
    pub batch: usize,
    pub seed: u64,
}

impl Default for SampleConfig {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::FirstHitting,
            steps: 1000,
            nucleus_p: 0.9,
            nucleus_rule: NucleusRule::Standard,
            temperature: 1.0,
            kv_cache: true,
            var_length: false,
            batch: 1,
            seed: 1,
        }
    }
}

/// Where and how often training state is saved, and what is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// A local path or object-store URL (`s3://bucket/prefix`, `gs://…`); empty means
    /// `<run dir>/checkpoints`.
    pub url: String,
    /// Save every this many steps (0 = only at the end of the run).
    pub every: u64,
    /// Keep the latest this many checkpoints (at least 2) …
    pub keep_latest: usize,
    /// … plus every step divisible by this, forever (0 = none).
    pub keep_every: u64,
    /// Upload in a background thread while training goes on.
    pub async_save: bool,
    /// Resume from `"none"`, `"auto"` (the latest committed step that verifies) or a step number.
    pub resume: ResumeFrom,
    /// A rank's state is split into safetensors files of at most this many MiB.
    pub max_file_mib: u64,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            every: 0,
            keep_latest: 3,
            keep_every: 0,
            async_save: true,
            resume: ResumeFrom::None,
            max_file_mib: 4096,
        }
    }
}

/// Collectives between the ranks of a multi-process run (trainer::dist).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistConfig {
    /// A collective that has not completed after this many seconds ends the process with an
    /// error (a peer died or hangs). Longer than the slowest thing one rank does alone (a
    /// synchronous checkpoint save on rank 0, a validation).
    pub timeout_s: f64,
    /// Gradients are all-reduced in flat buffers of at most this many MiB.
    pub bucket_mib: f64,
    /// ZeRO-1: shard the optimizer state across the ranks (reduce-scatter the gradients, each
    /// rank updates its shard, all-gather the parameters) instead of all-reducing the gradients
    /// and updating everything on every rank (trainer::zero).
    pub zero: bool,
    /// Average each gradient bucket over the ranks (with `zero`, reduce-scatter it) as soon as
    /// backward has produced it, while backward goes on (trainer::dist::overlap; CPU tensors
    /// over MPI, CUDA tensors over NCCL on a stream of their own).
    /// The result is bitwise that of reducing after backward. Off by default: on CPU the
    /// reduction needs a core of its own to pay off, and with every core computing it slowed the
    /// step (docs/benchmarks.md).
    pub overlap: bool,
}

impl Default for DistConfig {
    fn default() -> Self {
        Self { timeout_s: 600.0, bucket_mib: 25.0, zero: false, overlap: false }
    }
}

impl DistConfig {
    pub fn options(&self) -> crate::dist::DistOptions {
        crate::dist::DistOptions { timeout: std::time::Duration::from_secs_f64(self.timeout_s) }
    }

    pub fn bucket_bytes(&self) -> usize {
        (self.bucket_mib * (1 << 20) as f64) as usize
    }
}

/// What a run tells the outside world while it trains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `host:port` of the Prometheus endpoint (`GET /metrics`) of local rank 0; local rank r
    /// serves port + r. Empty: no endpoint. Port 0: each rank takes a free port and logs it.
    pub listen: String,
    /// Peak FLOP/s (in TFLOP/s) of one device for MFU. Unset: the bf16 peak of a known GPU
    /// (trainer::flops); on the CPU only FLOP/s are reported.
    pub peak_tflops: Option<f64>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { listen: "127.0.0.1:9400".into(), peak_tflops: None }
    }
}

/// The sampler's denoising rule (`sample.algorithm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// One uniformly chosen masked position unmasked per network call (docs/algorithm.md §5.2).
    FirstHitting,
    /// T steps per block on t = 1, 1 − 1/T, …; each masked token is revealed with
    /// probability 1 − s/t per step.
    Ancestral,
}

/// Which tokens the nucleus (top-p) filter keeps (`sample.nucleus_rule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NucleusRule {
    /// Standard top-p: the smallest set of most likely tokens whose mass reaches p.
    Standard,
    /// The reference's variant: tokens whose cumulative mass stays ≤ p, plus the top-1; the token
    /// that crosses p is dropped (docs/algorithm.md §5.4).
    Reference,
}

/// `train.device`: written `"auto"`, `"cpu"`, `"cuda"` or `"cuda:N"` in a config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    /// CUDA device 0 when one is available, else the CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

impl TryFrom<String> for DeviceSpec {
    type Error = String;

    fn try_from(spec: String) -> Result<Self, String> {
        let cuda = |index: &str| index.parse().map(DeviceSpec::Cuda).ok();
        match spec.as_str() {
            "auto" => Some(Self::Auto),
            "cpu" => Some(Self::Cpu),
            "cuda" => Some(Self::Cuda(0)),
            other => other.strip_prefix("cuda:").and_then(cuda),
        }
        .ok_or_else(|| format!("expected \"auto\", \"cpu\" or \"cuda[:N]\", found {spec:?}"))
    }
}

impl From<DeviceSpec> for String {
    fn from(spec: DeviceSpec) -> String {
        match spec {
            DeviceSpec::Auto => "auto".into(),
            DeviceSpec::Cpu => "cpu".into(),
            DeviceSpec::Cuda(i) => format!("cuda:{i}"),
        }
    }
}

/// `checkpoint.resume`: `"none"`, `"auto"` or a step number (written as a string or a number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "StepOrWord", into = "String")]
pub enum ResumeFrom {
    /// Start fresh; refused where committed checkpoints already exist.
    None,
    /// The latest committed step that verifies (half-written steps are cleaned first).
    Auto,
    Step(u64),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StepOrWord {
    Step(u64),
    Word(String),
}

impl TryFrom<StepOrWord> for ResumeFrom {
    type Error = String;

    fn try_from(value: StepOrWord) -> Result<Self, String> {
        match value {
            StepOrWord::Step(step) => Ok(Self::Step(step)),
            StepOrWord::Word(word) => match word.as_str() {
                "none" => Ok(Self::None),
                "auto" => Ok(Self::Auto),
                _ => word
                    .parse()
                    .map(Self::Step)
                    .map_err(|_| format!("expected \"none\", \"auto\" or a step number, found {word:?}")),
            },
        }
    }
}

impl From<ResumeFrom> for String {
    fn from(resume: ResumeFrom) -> String {
        match resume {
            ResumeFrom::None => "none".into(),
            ResumeFrom::Auto => "auto".into(),
            ResumeFrom::Step(step) => step.to_string(),
        }
    }
}

impl Config {
    /// Reads `path`, applies `overrides` (`section.field=value`, value in TOML syntax or a bare
    /// string) and validates the result. Errors name the file and the offending field.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        Self::from_toml_str(&text, overrides).with_context(|| format!("in config {}", path.display()))
    }

    pub fn from_toml_str(text: &str, overrides: &[String]) -> Result<Self> {
        let mut table: toml::Table = toml::from_str(text)?;
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let path = e.path().to_string();
            anyhow::anyhow!("field `{path}`: {}", e.into_inner())
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    pub fn run_dir(&self) -> PathBuf {
        self.run.dir.join(&self.run.name)
    }

    /// The checkpoint location: `checkpoint.url`, or `<run dir>/checkpoints`.
    pub fn checkpoint_url(&self) -> String {
        if self.checkpoint.url.is_empty() {
            self.run_dir().join("checkpoints").to_string_lossy().into_owned()
        } else {
            self.checkpoint.url.clone()
        }
    }

    /// Checks every field with a range, naming the field and the range it must lie in.
    pub fn validate(&self) -> Result<()> {
        let (m, d, o, t, s, c) =
            (&self.model, &self.diffusion, &self.optim, &self.train, &self.sample, &self.checkpoint);
        for (field, value) in [
            ("model.hidden", m.hidden),
            ("model.layers", m.layers),
            ("model.heads", m.heads),
            ("model.cond_dim", m.cond_dim),
            ("model.mlp_ratio", m.mlp_ratio),
            ("train.micro_batch", t.micro_batch),
            ("train.grad_accum", t.grad_accum),
            ("train.log_every", t.log_every as usize),
            ("train.max_consecutive_skips", t.max_consecutive_skips as usize),
            ("sample.steps", s.steps),
            ("sample.batch", s.batch),
            ("checkpoint.max_file_mib", c.max_file_mib as usize),
        ] {
            ensure!(value > 0, "{field} ({value}) must be positive");
        }
        ensure!(m.hidden % m.heads == 0, "model.hidden ({}) must be a multiple of model.heads ({})", m.hidden, m.heads);
        ensure!(
            m.head_dim() % 2 == 0,
            "model.hidden / model.heads ({}) must be even for rotary embeddings",
            m.head_dim()
        );
        ensure!(m.seq_len >= 2, "model.seq_len ({}) must be at least 2", m.seq_len);
        ensure!(m.vocab_size >= 2, "model.vocab_size ({}) must be at least 2", m.vocab_size);
        ensure!(
            (d.mask_id as usize) < m.vocab_size,
            "diffusion.mask_id ({}) must be below model.vocab_size ({})",
            d.mask_id,
            m.vocab_size
        );
        // The σ-map exists so that the reference's checkpoints load, but BD3-LM and MDLM train
        // with σ ≡ 0 (docs/algorithm.md §1.3); feeding σ(t) is not wired through the objective and sampler.
        ensure!(
            !m.time_conditioning,
            "model.time_conditioning = true is not supported: BD3-LM and MDLM use a constant conditioning vector (σ ≡ 0)"
        );
        if m.arch == Arch::Bd3 {
            ensure!(
                d.block_size > 0 && m.seq_len % d.block_size == 0,
                "diffusion.block_size ({}) must divide model.seq_len ({})",
                d.block_size,
                m.seq_len
            );
        }
        let (lo, hi) = (d.sampling_eps_min, d.sampling_eps_max);
        ensure!(
            lo > 0.0 && lo <= hi && hi <= 1.0,
            "diffusion.sampling_eps_min/max ({lo}, {hi}) must satisfy 0 < min ≤ max ≤ 1"
        );
        in_range("diffusion.clip_search_delta", d.clip_search_delta, Open(0.0), Closed(1.0))?;
        for &w in &d.clip_search_widths {
            in_range("diffusion.clip_search_widths", w, Open(0.0), Closed(1.0))?;
        }
        if d.clip_search {
            ensure!(d.clip_search_batches > 0, "diffusion.clip_search_batches must be positive with clip_search");
        }
        in_range("model.dropout", m.dropout, Closed(0.0), Open(1.0))?;
        in_range("optim.lr", o.lr, Open(0.0), Unbounded)?;
        in_range("optim.beta1", o.beta1, Closed(0.0), Open(1.0))?;
        in_range("optim.beta2", o.beta2, Closed(0.0), Open(1.0))?;
        in_range("optim.eps", o.eps, Open(0.0), Unbounded)?;
        in_range("optim.weight_decay", o.weight_decay, Closed(0.0), Unbounded)?;
        in_range("optim.grad_clip", o.grad_clip, Closed(0.0), Unbounded)?;
        in_range("optim.ema_decay", o.ema_decay, Closed(0.0), Open(1.0))?;
        if let Some(max_loss) = t.max_loss {
            in_range("train.max_loss", max_loss, Open(0.0), Unbounded)?;
        }
        if let Some(source) = &t.init_from {
            ensure!(
                !source.trim().is_empty(),
                "train.init_from is empty: expected a checkpoint location or a .safetensors file"
            );
        }
        in_range("sample.nucleus_p", s.nucleus_p, Open(0.0), Closed(1.0))?;
        in_range("sample.temperature", s.temperature, Open(0.0), Unbounded)?;
        ensure!(c.keep_latest >= 2, "checkpoint.keep_latest ({}) must be at least 2", c.keep_latest);
        let d = &self.dist;
        in_range("dist.timeout_s", d.timeout_s, Open(0.0), Unbounded)?;
        in_range("dist.bucket_mib", d.bucket_mib, Open(0.0), Unbounded)?;
        for (field, id) in [("data.bos_id", self.data.bos_id), ("data.eos_id", self.data.eos_id)] {
            if let Some(id) = id {
                ensure!(
                    (id as usize) < m.vocab_size,
                    "{field} ({id}) must be below model.vocab_size ({})",
                    m.vocab_size
                );
            }
        }
        crate::telemetry::listen_address(&self.metrics.listen, 0)?;
        if let Some(peak) = self.metrics.peak_tflops {
            in_range("metrics.peak_tflops", peak, Open(0.0), Unbounded)?;
        }
        Ok(())
    }
}

/// One end of the range a config value must lie in.
#[derive(Clone, Copy)]
enum Bound {
    Open(f64),
    Closed(f64),
    /// No limit (but the value must be finite).
    Unbounded,
}
use Bound::{Closed, Open, Unbounded};

/// Refuses `value` outside (or at an open end of) the range, or not finite, naming `field`.
fn in_range(field: &str, value: f64, low: Bound, high: Bound) -> Result<()> {
    let above = match low {
        Open(l) => value > l,
        Closed(l) => value >= l,
        Unbounded => true,
    };
    let below = match high {
        Open(h) => value < h,
        Closed(h) => value <= h,
        Unbounded => true,
    };
    if value.is_finite() && above && below {
        return Ok(());
    }
    let low = match low {
        Open(l) => format!("({l}"),
        Closed(l) => format!("[{l}"),
        Unbounded => "(-∞".to_string(),
    };
    let high = match high {
        Open(h) => format!("{h})"),
        Closed(h) => format!("{h}]"),
        Unbounded => "∞)".to_string(),
    };
    bail!("{field} ({value}) must be a finite number in {low}, {high}")
}

/// `a.b.c=value`: sets a nested key, creating tables on the way. The value is parsed as TOML
/// (numbers, booleans, quoted strings, arrays); anything else is taken as a string.
fn apply_override(table: &mut toml::Table, spec: &str) -> Result<()> {
    let (key, raw) =
        spec.split_once('=').with_context(|| format!("override {spec:?} is not of the form section.field=value"))?;
    let path: Vec<&str> = key.trim().split('.').collect();
    ensure!(path.iter().all(|p| !p.is_empty()), "override {spec:?} has an empty key component");
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").expect("parsed key"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let (last, parents) = path.split_last().expect("non-empty path");
    let mut cursor = table;
    for (i, p) in parents.iter().enumerate() {
        let entry = cursor.entry(p.to_string()).or_insert_with(|| toml::Value::Table(Default::default()));
        cursor = match entry {
            toml::Value::Table(t) => t,
            _ => bail!("override {spec:?}: `{}` is not a section", path[..=i].join(".")),
        };
    }
    cursor.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_reference_recipe() {
        let c = Config::from_toml_str("", &[]).unwrap();
        assert_eq!(c.model, ModelConfig::small());
        assert_eq!((c.optim.lr, c.optim.beta1, c.optim.beta2, c.optim.eps), (3e-4, 0.9, 0.999, 1e-8));
        assert_eq!((c.optim.weight_decay, c.optim.warmup_steps, c.optim.grad_clip), (0.0, 2500, 1.0));
        assert_eq!(c.optim.ema_decay, 0.9999);
        assert_eq!((c.diffusion.sampling_eps_min, c.diffusion.sampling_eps_max), (1e-3, 1.0));
    }

    #[test]
    fn overrides_apply_and_round_trip() {
        let sets = ["optim.lr=1e-3".to_string(), "run.name=abc".into(), "model.layers=2".into()];
        let c = Config::from_toml_str("[model]\nhidden = 64\nheads = 4\n", &sets).unwrap();
        assert_eq!((c.optim.lr, c.run.name.as_str(), c.model.layers, c.model.hidden), (1e-3, "abc", 2, 64));
        assert_eq!(Config::from_toml_str(&c.to_toml().unwrap(), &[]).unwrap(), c);
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::from_toml_str("[model]\nhiden = 3\n", &[]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("model.hiden") && msg.contains("unknown field"), "{msg}");
        let err = Config::from_toml_str("", &["optim.lr_max=1".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("optim.lr_max"), "{err:#}");
        let err = Config::from_toml_str("[model]\nlayers = \"x\"\n", &[]).unwrap_err();
        assert!(format!("{err:#}").contains("model.layers"), "{err:#}");
    }

    #[test]
    fn invalid_values_are_named() {
        let err = Config::from_toml_str("[diffusion]\nblock_size = 3\n", &[]).unwrap_err();
        assert!(err.to_string().contains("diffusion.block_size"), "{err}");
        let err = Config::from_toml_str("[model]\ntime_conditioning = true\n", &[]).unwrap_err();
        assert!(err.to_string().contains("model.time_conditioning"), "{err}");
        let err = Config::from_toml_str("[model]\nheads = 5\n", &[]).unwrap_err();
        assert!(err.to_string().contains("model.heads"), "{err}");
        assert!(Config::from_toml_str("", &["optim.lr".into()]).is_err());
        let err = Config::from_toml_str("", &["train.device=\"gpu\"".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("train.device"), "{err:#}");
        let err = Config::from_toml_str("", &["checkpoint.resume=\"latest\"".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("checkpoint.resume"), "{err:#}");
    }

    /// Every value out of its range is refused at start, naming the field.
    #[test]
    fn out_of_range_values_are_refused_naming_the_field() {
        for (set, field) in [
            ("optim.lr=-1e-3", "optim.lr"),
            ("optim.lr=0.0", "optim.lr"),
            ("optim.lr=nan", "optim.lr"),
            ("optim.lr=inf", "optim.lr"),
            ("optim.beta1=1.0", "optim.beta1"),
            ("optim.beta2=-0.1", "optim.beta2"),
            ("optim.eps=0.0", "optim.eps"),
            ("optim.weight_decay=-1.0", "optim.weight_decay"),
            ("optim.grad_clip=-1.0", "optim.grad_clip"),
            ("optim.ema_decay=1.5", "optim.ema_decay"),
            ("optim.ema_decay=1.0", "optim.ema_decay"),
            ("model.dropout=1.0", "model.dropout"),
            ("model.cond_dim=0", "model.cond_dim"),
            ("model.mlp_ratio=0", "model.mlp_ratio"),
            ("model.vocab_size=1", "model.vocab_size"),
            ("diffusion.mask_id=60000", "diffusion.mask_id"),
            ("diffusion.sampling_eps_min=0.0", "diffusion.sampling_eps_min"),
            ("diffusion.clip_search_delta=2.0", "diffusion.clip_search_delta"),
            ("diffusion.clip_search_widths=[0.5, 1.5]", "diffusion.clip_search_widths"),
            ("diffusion.clip_search_batches=0", "diffusion.clip_search_batches"),
            ("train.micro_batch=0", "train.micro_batch"),
            ("train.grad_accum=0", "train.grad_accum"),
            ("train.log_every=0", "train.log_every"),
            ("train.max_loss=-5.0", "train.max_loss"),
            ("train.max_consecutive_skips=0", "train.max_consecutive_skips"),
            ("train.on_nonfinite=\"ignore\"", "train.on_nonfinite"),
            ("sample.nucleus_p=0.0", "sample.nucleus_p"),
            ("sample.temperature=0.0", "sample.temperature"),
            ("sample.steps=0", "sample.steps"),
            ("checkpoint.keep_latest=1", "checkpoint.keep_latest"),
            ("checkpoint.max_file_mib=0", "checkpoint.max_file_mib"),
            ("dist.timeout_s=0.0", "dist.timeout_s"),
            ("dist.bucket_mib=-1.0", "dist.bucket_mib"),
            ("train.init_from=\"\"", "train.init_from"),
        ] {
            let err = match Config::from_toml_str("", &[set.to_string()]) {
                Ok(_) => panic!("{set} was accepted"),
                Err(e) => format!("{e:#}"),
            };
            assert!(err.contains(field), "{set}: {err}");
        }
        let err = format!("{:#}", Config::from_toml_str("", &["optim.lr=-1e-3".into()]).unwrap_err());
        assert_eq!(err, "optim.lr (-0.001) must be a finite number in (0, ∞)");
        assert!(
            Config::from_toml_str("", &["train.max_loss=20.0".into(), "train.on_nonfinite=\"skip\"".into()]).is_ok()
        );
    }

    /// `train.init_from` is absent from a config that does not set it (hashes and written configs
    /// of existing runs stay the same), and round-trips when set.
    #[test]
    fn init_from_is_optional_and_round_trips() {
        let c = Config::from_toml_str("", &[]).unwrap();
        assert!(!c.to_toml().unwrap().contains("init_from"));
        let c = Config::from_toml_str("", &["train.init_from=runs/a/checkpoints".into()]).unwrap();
        assert_eq!(c.train.init_from.as_deref(), Some("runs/a/checkpoints"));
        assert_eq!(Config::from_toml_str(&c.to_toml().unwrap(), &[]).unwrap(), c);
    }

    #[test]
    fn device_and_resume_parse_once_and_round_trip() {
        let sets = ["train.device=\"cuda:1\"".to_string(), "checkpoint.resume=7".into()];
        let c = Config::from_toml_str("", &sets).unwrap();
        assert_eq!((c.train.device, c.checkpoint.resume), (DeviceSpec::Cuda(1), ResumeFrom::Step(7)));
        assert_eq!(Config::from_toml_str(&c.to_toml().unwrap(), &[]).unwrap(), c);
        let c = Config::from_toml_str("", &["checkpoint.resume=\"auto\"".into(), "train.device=\"cuda\"".into()]);
        let c = c.unwrap();
        assert_eq!((c.train.device, c.checkpoint.resume), (DeviceSpec::Cuda(0), ResumeFrom::Auto));
    }
}
