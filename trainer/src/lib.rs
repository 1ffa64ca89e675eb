//! bd3's trainer: the BD3-LM model, its block-diffusion objective, the optimizer, the training
//! loop, sampling and evaluation. Sections cited as §n are those of `docs/algorithm.md`.
//!
//! Module map, roughly in the order a training run meets them:
//!
//! | module | what |
//! |---|---|
//! | [`config`] | the run configuration: TOML, `--set` overrides, validation |
//! | [`train`] | the training loop ([`train::train`]) and [`train::Trainer`] |
//! | [`data`] | training batches and validation tokens (prepared shards or an in-memory corpus) |
//! | [`model`] | the DiT backbone and the AR variant (docs/algorithm.md §1) |
//! | [`diffusion`] | the vectorized block-diffusion objective: noise, mask, SUBS, NELBO (docs/algorithm.md §2–§3) |
//! | [`objective`] | the loss a model trains with: block diffusion or next-token prediction |
//! | [`optim`] | AdamW, the learning-rate schedule, gradient clipping, the EMA (docs/algorithm.md §8) |
//! | [`optimizer`] | the run's optimizer: replicated AdamW or ZeRO-1 ([`zero`]) |
//! | [`validation`] | validation NELBO and the clip search during training |
//! | [`eval`] | NELBO perplexity, clip search, generative perplexity (docs/algorithm.md §4, §6) |
//! | [`sample`] | the sampler: KV cache, first-hitting / ancestral, nucleus, variable length (docs/algorithm.md §5) |
//! | [`state`] | everything a checkpoint holds, as one unit ([`state::TrainState`]) |
//! | [`stateful`] | the [`stateful::Stateful`] trait and tensor ⇄ checkpoint-buffer conversions |
//! | [`progress`] | the non-tensor part of the state: step, counters, clip interval, data position |
//! | [`resume`] | which checkpoint a run starts from, and job attempt ids |
//! | [`init`] | `--init-from`: a run that starts from another run's weights (the second stage) |
//! | [`weights`] | weights in and out of checkpoints (`bd3 ckpt export/import`) |
//! | [`metrics`] | `metrics.jsonl` |
//! | [`telemetry`] | the Prometheus endpoint (`metrics.listen`) and its gauges |
//! | [`flops`] | model FLOPs of a step, GPU peaks, MFU |
//! | [`plan`] | the capacity planner (`bd3 plan`): memory, step time, all-reduce, GPU-hours |
//! | [`run_stamp`] | `run.json` (commit, config hash, versions, hosts) and the progress bar |
//! | [`dist`] | collectives: the communicator trait, MPI, NCCL, gradient buckets, watchdog |
//! | [`preemption`] | SIGTERM/SIGUSR1 as a coordinated stop of every rank |
//! | [`device`] | device selection and the host allocator's tuning |
//! | [`rng`] | the counter-based generator every random draw comes from |
//! | [`reference`] | slow references the fast paths are tested against |

pub mod config;
pub mod data;
pub mod device;
pub mod diffusion;
pub mod dist;
pub mod eval;
pub mod flops;
pub mod init;
pub mod metrics;
pub mod model;
pub mod objective;
pub mod optim;
pub mod optimizer;
pub mod plan;
pub mod preemption;
pub mod progress;
pub mod reference;
pub mod resume;
pub mod rng;
pub mod run_stamp;
pub mod sample;
pub mod state;
pub mod stateful;
pub mod telemetry;
pub mod train;
pub mod validation;
pub mod weights;
pub mod zero;

pub use config::Config;
pub use model::Dit;
