//! `bd3`: the command line. Parsing and dispatch only; the work lives in the library crates.

mod ckpt;
mod prepare;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;
use trainer::sample::SampleOptions;
use trainer::Config;

#[derive(Parser)]
#[command(name = "bd3", version, about = "Pretrain and sample Block Diffusion language models (BD3-LMs)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// `text` log lines, or `json`: one JSON object per line, for log collectors.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model from a TOML config.
    Train {
        #[command(flatten)]
        config: ConfigArgs,
        /// Resume from `auto` (the latest committed checkpoint that verifies), a step number, or
        /// `none`; the same as --set checkpoint.resume=….
        #[arg(long)]
        resume: Option<String>,
        /// Start from another run's weights: a checkpoint location (its newest committed step),
        /// a `…/step-NNNNNNNNNN` directory of one, or a .safetensors file. The optimizer, EMA,
        /// step, data order and clip interval start fresh (the paper's second stage); a
        /// checkpoint of this run wins (`--resume auto` resumes it). The same as
        /// --set train.init_from=….
        #[arg(long, value_name = "CHECKPOINT_OR_SAFETENSORS")]
        init_from: Option<String>,
        /// Load and validate the config, print what the run would do, and exit without training.
        #[arg(long)]
        dry_run: bool,
    },
    /// Checkpoints: ls, inspect, verify, export, import.
    #[command(subcommand)]
    Ckpt(ckpt::Ckpt),
    /// Start bd3 as a multi-process job.
    #[command(subcommand)]
    Launch(Launch),
    /// Tokenize a text corpus into Parquet shards and an index.json (see dataloader).
    Prepare(prepare::PrepareArgs),
    /// Evaluate trained weights.
    #[command(subcommand)]
    Eval(Eval),
    /// Capacity planner: per-GPU memory, the largest micro-batch that fits, FLOPs, step time at a
    /// stated MFU, all-reduce time (α-β model) with and without overlap, tokens/s, wall-clock
    /// time and GPU-hours of `train.steps` (docs/scaling.md).
    Plan {
        #[command(flatten)]
        config: ConfigArgs,
        /// A100, H100, H200 or B200.
        #[arg(long, default_value = "H100")]
        gpu: String,
        #[arg(long, default_value_t = 8)]
        gpus_per_node: usize,
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        /// Between nodes: infiniband (400 Gb/s per GPU) or ethernet (100 Gb/s per node).
        #[arg(long, default_value = "infiniband")]
        interconnect: String,
        /// The model FLOPs utilization to project the step time at.
        #[arg(long, default_value_t = 0.4)]
        mfu: f64,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Charts (PNG) of runs' metrics against step and tokens, several runs overlaid, and a
    /// report.md with provenance, final metrics and config differences.
    Report {
        /// Run directories (each with metrics.jsonl, config.toml, run.json).
        #[arg(required_unless_present = "points")]
        runs: Vec<PathBuf>,
        /// Where to write (default: `report/` inside the first run directory); with --points,
        /// the PNG file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Instead of runs: draw one chart of the points in this JSONL file, one object per line
        /// with `series` (the legend), `x` and `y` (experiments/ use it for their plots).
        #[arg(long, conflicts_with = "runs", requires = "out")]
        points: Option<PathBuf>,
        /// The chart's title and axis names (with --points).
        #[arg(long, requires = "points", default_value = "")]
        title: String,
        #[arg(long, requires = "points", default_value = "x")]
        x_label: String,
        #[arg(long, requires = "points", default_value = "y")]
        y_label: String,
    },
    /// Generate text with trained weights (a run's model.safetensors). Sampler settings come
    /// from the config's [sample] section (--set sample.algorithm=ancestral, sample.batch=4, ...).
    Sample {
        #[command(flatten)]
        config: ConfigArgs,
        /// Weights to load, in safetensors format with the reference's parameter names.
        #[arg(long)]
        weights: PathBuf,
        /// Tokens per sequence, BOS included (the cap with sample.var_length).
        #[arg(long, default_value_t = 128)]
        tokens: usize,
        /// `text`, or `jsonl`: one object per sequence with tokens, text, NFE and stop reason.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
}

#[derive(Subcommand)]
enum Launch {
    /// N processes on this machine through mpirun (as root too, more ranks than cores allowed):
    /// `bd3 launch local --nproc 2 train --config configs/tiny.toml --set train.device="cpu"`.
    Local {
        #[arg(long)]
        nproc: usize,
        /// The bd3 command every rank runs.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
    /// A run on a Slurm cluster: writes an sbatch script into the run directory and submits it;
    /// the job checkpoints and requeues itself on USR1 and resumes exactly (README "Slurm"):
    /// `bd3 launch slurm --nodes 2 --gpus-per-node 8 -- train --config configs/small.toml`.
    Slurm(launcher::slurm::SlurmArgs),
    /// A run on Kubernetes: renders an MPIJob overlay of the base in k8s/ into the run directory
    /// and with --apply applies it (README "Kubernetes", k8s/README.md).
    K8s(launcher::k8s::K8sArgs),
}

#[derive(Subcommand)]
enum Eval {
    /// NELBO perplexity bound of a split (docs/algorithm.md §6.1): NLL, perplexity and bits per token.
    Ppl {
        #[command(flatten)]
        split: SplitArgs,
        /// Evaluate only the first N batches of train.micro_batch sequences (0 = all).
        #[arg(long, default_value_t = 0)]
        batches: usize,
        /// Draw t from [BETA, OMEGA] instead of [1e-3, 1]: `1,1` at L' = 1 (full masking) gives
        /// the exact NLL; other clipped intervals are biased estimates (docs/algorithm.md §3.4).
        #[arg(long, value_name = "BETA,OMEGA", value_parser = parse_interval)]
        interval: Option<trainer::diffusion::ClipInterval>,
    },
    /// The clip search of docs/algorithm.md §4.2 on trained weights: for every candidate interval,
    /// the mean per-batch variance of the per-block losses (the paper's "Var. of NELBO"), and the
    /// interval it would pick.
    Clip {
        #[command(flatten)]
        split: SplitArgs,
        /// Batches of train.micro_batch sequences scored (0 = diffusion.clip_search_batches).
        #[arg(long, default_value_t = 0)]
        batches: usize,
    },
    /// Generative perplexity under an AR judge (mean of per-sample perplexities, windows of the
    /// judge's context moving by half of it, EOS targets excluded), unigram entropy and lengths.
    Gen(GenArgs),
}

#[derive(Args)]
struct GenArgs {
    /// Samples to score, one JSON object per line with a `tokens` array (`bd3 sample --format
    /// jsonl`). Without it, samples are generated with --config/--weights.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Config and weights of the model to sample from (when no --input is given).
    #[arg(long, requires = "weights")]
    config: Option<PathBuf>,
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Overrides for --config (e.g. --set sample.batch=8).
    #[arg(long = "set", value_name = "SECTION.FIELD=VALUE")]
    overrides: Vec<String>,
    /// Sequences to generate, in batches of sample.batch.
    #[arg(long, default_value_t = 4)]
    samples: usize,
    /// Tokens per generated sequence, BOS included.
    #[arg(long, default_value_t = 128)]
    tokens: usize,
    /// The judge: an AR model trained by bd3 (model.arch = "ar"), its config and weights.
    #[arg(long)]
    judge_config: PathBuf,
    #[arg(long)]
    judge_weights: PathBuf,
}

/// Weights and the split of their config's data set that `bd3 eval ppl` and `eval clip` score.
#[derive(Args)]
struct SplitArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Weights to evaluate (a run's model.safetensors holds the EMA weights).
    #[arg(long)]
    weights: PathBuf,
    #[arg(long, value_enum, default_value_t = Split::Valid)]
    split: Split,
    /// Print one JSON object with full precision.
    #[arg(long)]
    json: bool,
}

/// What `bd3 eval ppl` and `eval clip` evaluate: the model on this rank's device, the split's
/// tokens (the first `batches` batches, 0 = all) and the objective. Under a launcher (bd3 launch
/// local, srun) the ranks share the batches out.
struct SplitEval {
    cfg: Config,
    dist: trainer::dist::Dist,
    model: trainer::Dit,
    _vs: tch::nn::VarStore,
    tokens: Vec<u32>,
    objective: trainer::objective::Objective,
}

impl SplitArgs {
    fn open(&self, batches: usize) -> Result<SplitEval> {
        let cfg = self.config.load()?;
        if cfg.train.threads > 0 {
            tch::set_num_threads(cfg.train.threads as i32);
        }
        let dist = trainer::dist::init(cfg.dist.options())?;
        let gpus = tch::Cuda::device_count().max(0) as usize;
        let device = trainer::device::rank_device(cfg.train.device, &dist.placement, gpus)?;
        let (model, vs) = load_model_on(&cfg, &self.weights, device)?;
        let split = match self.split {
            Split::Train => dataloader::SplitName::Train,
            Split::Valid => dataloader::SplitName::Valid,
        };
        let max_sequences = (batches > 0).then_some(batches * cfg.train.micro_batch);
        let tokens = trainer::data::split_tokens(&cfg, split, max_sequences)?;
        let objective = trainer::objective::Objective::new(&cfg)?;
        Ok(SplitEval { cfg, dist, model, _vs: vs, tokens, objective })
    }
}

impl SplitEval {
    fn batches(&self, max_batches: usize) -> trainer::eval::EvalBatches {
        trainer::eval::EvalBatches {
            seq_len: self.cfg.model.seq_len,
            micro_batch: self.cfg.train.micro_batch,
            max_batches,
        }
    }
}

fn parse_interval(text: &str) -> Result<trainer::diffusion::ClipInterval, String> {
    let parsed =
        text.split_once(',').and_then(|(b, o)| Some((b.trim().parse::<f64>().ok()?, o.trim().parse::<f64>().ok()?)));
    match parsed {
        Some((beta, omega)) if 0.0 < beta && beta <= omega && omega <= 1.0 => {
            Ok(trainer::diffusion::ClipInterval { beta, omega })
        }
        _ => Err(format!("expected BETA,OMEGA with 0 < BETA <= OMEGA <= 1 (e.g. 0.45,0.95), got {text:?}")),
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Split {
    Train,
    Valid,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Jsonl,
}

#[derive(Args)]
struct ConfigArgs {
    /// Config file (TOML); see configs/.
    #[arg(long)]
    config: PathBuf,
    /// Override a config field, e.g. --set optim.lr=1e-3 (repeatable).
    #[arg(long = "set", value_name = "SECTION.FIELD=VALUE")]
    overrides: Vec<String>,
}

impl ConfigArgs {
    fn load(&self) -> Result<Config> {
        Config::load(&self.config, &self.overrides)
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(|| trainer::run_stamp::StderrAboveProgress);
    match cli.log_format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().init(),
    }
    trainer::weights::set_binary_commit(env!("BD3_GIT_COMMIT"));
    match cli.command {
        Command::Train { config, resume, init_from, dry_run } => {
            // The same loading as a scheduled job's, checked on the submitting machine.
            let overrides = with_init_from(config.overrides, init_from);
            let cfg = launcher::TrainCommand::load(config.config, overrides, resume)?.config;
            if dry_run {
                print!("{}", launcher::dry_run_summary(&cfg)?);
                return Ok(());
            }
            let outcome = trainer::train::train(&cfg)?;
            if let Some(nelbo) = outcome.final_valid_nelbo {
                println!("validation NELBO {nelbo:.4} nats/token (perplexity ≤ {:.2})", nelbo.exp());
            }
            if let Some(text) = outcome.sample {
                println!("--- sample ---\n{text}\n--------------");
            }
            println!("run directory: {}", outcome.run_dir.display());
        }
        Command::Ckpt(c) => ckpt::run(c)?,
        Command::Plan { config, gpu, gpus_per_node, nodes, interconnect, mfu, json } => {
            use trainer::plan;
            let cfg = config.load()?;
            let cluster = plan::Cluster {
                gpu: plan::gpu(&gpu)?,
                gpus_per_node,
                nodes,
                interconnect: plan::interconnect(&interconnect, gpus_per_node.max(1))?,
                mfu,
            };
            let plan = plan::plan(&cfg, cluster)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&plan)?);
            } else {
                print!("{}", plan.render());
            }
        }
        Command::Report { points: Some(points), out, title, x_label, y_label, .. } => {
            let png = out.context("--points needs --out <file.png>")?;
            let labels = launcher::report::ChartLabels { title: &title, x: &x_label, y: &y_label, markers: true };
            launcher::report::draw_points(&points, &labels, &png)?;
            println!("wrote {}", png.display());
        }
        Command::Report { runs, out, .. } => {
            let loaded = runs.iter().map(|dir| launcher::report::Run::load(dir)).collect::<Result<Vec<_>>>()?;
            let out = out.unwrap_or_else(|| runs[0].join("report"));
            let files = launcher::report::write_report(&loaded, &out)?;
            println!("wrote {} files to {} (report.md and the charts)", files.len(), out.display());
        }
        Command::Launch(Launch::Local { nproc, command }) => {
            anyhow::ensure!(nproc > 0, "--nproc must be at least 1");
            let bd3 = std::env::current_exe().context("locating the bd3 binary")?;
            let mut mpirun = launcher::local::mpirun_command(nproc);
            mpirun.arg(bd3).args(&command);
            let status = launcher::local::status_forwarding_signals(&mut mpirun)
                .context("starting mpirun (Open MPI; scripts/setup.sh installs it)")?;
            // The job's status is ours: a scheduler's requeue logic reads it.
            std::process::exit(status.code().unwrap_or(1));
        }
        Command::Launch(Launch::Slurm(args)) => launcher::slurm::launch(&args, scheduled_train(&args.command)?)?,
        Command::Launch(Launch::K8s(args)) => launcher::k8s::launch(&args, scheduled_train(&args.command)?)?,
        Command::Prepare(args) => prepare::run(args)?,
        Command::Eval(Eval::Ppl { split, batches, interval }) => {
            let run = split.open(batches)?;
            anyhow::ensure!(
                interval.is_none() || run.objective.diffusion().is_some(),
                "{}: --interval draws the diffusion noise; an AR model (model.arch = \"ar\") has none",
                split.config.config.display()
            );
            let comm = run.dist.comm();
            let busy = launcher::spinner("evaluating the NELBO");
            let report = trainer::eval::nelbo_on_interval(
                &run.model,
                &run.objective,
                &run.tokens,
                run.batches(batches),
                interval.unwrap_or(trainer::diffusion::ClipInterval::FULL),
                run.cfg.train.seed,
                comm,
            )?;
            busy.finish_and_clear();
            match (comm.rank(), split.json) {
                (0, true) => {
                    let value = serde_json::json!({
                        "nll": report.nll, "ppl": report.ppl(), "bits_per_token": report.bits_per_token(),
                        "tokens": report.tokens, "ranks": comm.world_size(),
                    });
                    println!("{value}");
                }
                (0, false) => println!(
                    "NLL {:.4} nats/token  PPL {:.2}  {:.4} bits/token  over {} tokens",
                    report.nll,
                    report.ppl(),
                    report.bits_per_token(),
                    report.tokens
                ),
                _ => {}
            }
        }
        Command::Eval(Eval::Clip { split, batches }) => {
            let d = split.config.load()?.diffusion;
            let batches = if batches > 0 { batches } else { d.clip_search_batches.max(1) };
            let run = split.open(batches)?;
            let comm = run.dist.comm();
            let Some(objective) = run.objective.diffusion() else {
                anyhow::bail!(
                    "{}: the clip search needs a diffusion model, not model.arch = \"ar\"",
                    split.config.config.display()
                );
            };
            let candidates = trainer::eval::clip_candidates(d.block_size, &d.clip_search_widths, d.clip_search_delta);
            let busy = launcher::spinner("scoring the clip intervals");
            let search = trainer::eval::clip_search(
                &run.model,
                objective,
                &run.tokens,
                run.batches(batches),
                candidates,
                run.cfg.train.seed,
                comm,
            )?;
            busy.finish_and_clear();
            let scored: Vec<_> = (0..search.candidates.len())
                .filter(|&i| search.batches[i] > 0)
                .map(|i| (search.candidates[i], search.variance_sums[i] / search.batches[i] as f64, search.batches[i]))
                .collect();
            let best = search.best().context("no clip interval could be scored (is the split empty?)")?;
            match (comm.rank(), split.json) {
                (0, true) => {
                    let interval = |c: trainer::diffusion::ClipInterval| serde_json::json!([c.beta, c.omega]);
                    let value = serde_json::json!({
                        "best": {"interval": interval(best.0), "variance": best.1},
                        "candidates": scored.iter().map(|&(c, v, n)| serde_json::json!({
                            "interval": interval(c), "variance": v, "batches": n,
                        })).collect::<Vec<_>>(),
                    });
                    println!("{value}");
                }
                (0, false) => {
                    for (c, v, n) in &scored {
                        println!("[{:.3}, {:.3}]  variance {v:.4}  over {n} batches", c.beta, c.omega);
                    }
                    println!("best: [{:.3}, {:.3}]  variance {:.4}", best.0.beta, best.0.omega, best.1);
                }
                _ => {}
            }
        }
        Command::Eval(Eval::Gen(args)) => {
            let samples = match &args.input {
                Some(path) => read_samples(path)?,
                None => {
                    let (Some(config), Some(weights)) = (&args.config, &args.weights) else {
                        anyhow::bail!("bd3 eval gen needs --input, or --config and --weights to sample from");
                    };
                    let cfg = Config::load(config, &args.overrides)?;
                    let (model, _vs, device) = load_model(&cfg, weights)?;
                    let mut samples = Vec::new();
                    let mut opts = SampleOptions::for_run(&cfg, args.tokens)?;
                    let bar = launcher::counter(args.samples as u64, "samples");
                    while samples.len() < args.samples {
                        opts.batch = opts.batch.min(args.samples - samples.len());
                        let g = trainer::sample::generate(&model, &cfg, &opts, device)?;
                        samples.extend(g.samples.into_iter().map(|s| s.tokens));
                        bar.set_position(samples.len() as u64);
                        opts.seed += 1;
                    }
                    bar.finish_and_clear();
                    samples
                }
            };
            let judge_cfg = Config::load(&args.judge_config, &[])?;
            anyhow::ensure!(
                judge_cfg.model.arch == trainer::config::Arch::Ar,
                "{}: the judge must be an AR model (model.arch = \"ar\")",
                args.judge_config.display()
            );
            let (judge, _jvs, _) = load_model(&judge_cfg, &args.judge_weights)?;
            let report = trainer::eval::generation_report(
                &judge,
                &samples,
                judge_cfg.model.seq_len,
                trainer::data::special_ids(&judge_cfg)?.eos,
                judge_cfg.diffusion.mask_id,
            )?;
            println!("{}", serde_json::to_string(&report)?);
            println!(
                "gen PPL {:.2} (mean of {} samples; corpus {:.2})  entropy {:.3} nats  length median {} max {}",
                report.mean_ppl,
                samples.len(),
                report.corpus_ppl,
                report.mean_entropy,
                report.median_length,
                report.max_length
            );
        }
        Command::Sample { config, weights, tokens, format } => {
            let cfg = config.load()?;
            let (model, _vs, device) = load_model(&cfg, &weights)?;
            let opts = SampleOptions::for_run(&cfg, tokens)?;
            let busy = launcher::spinner("sampling");
            let generation = trainer::sample::generate(&model, &cfg, &opts, device)?;
            busy.finish_and_clear();
            // `data.tokenizer`: a run's records the one it trained with; else the data set's.
            let tokenizer = trainer::data::sample_tokenizer(&cfg)?;
            for sample in &generation.samples {
                let text = tokenizer.decode(&sample.tokens);
                match format {
                    Format::Text => println!("{text}"),
                    Format::Jsonl => println!(
                        "{}",
                        serde_json::json!({
                            "tokens": sample.tokens, "text": text, "stop": sample.stop,
                            "nfe": generation.nfe, "tokens_per_s": generation.tokens_per_s(),
                        })
                    ),
                }
            }
            if let Format::Text = format {
                println!(
                    "[{} sequence(s), {} tokens each at most; NFE {}; {:.1} tokens/s]",
                    generation.samples.len(),
                    tokens,
                    generation.nfe,
                    generation.tokens_per_s()
                );
            }
        }
    }
    Ok(())
}

/// The `bd3 train …` command a scheduled job runs, parsed as `bd3` itself would parse it and
/// with its config validated, so that a mistake fails here and not after a wait in a queue.
fn scheduled_train(command: &[String]) -> Result<launcher::TrainCommand> {
    let cli = Cli::try_parse_from(std::iter::once("bd3").chain(command.iter().map(String::as_str)))
        .map_err(|e| anyhow::anyhow!("the command after `--` ({}): {e}", command.join(" ")))?;
    match cli.command {
        Command::Train { config, resume, init_from, .. } => {
            launcher::TrainCommand::load(config.config, with_init_from(config.overrides, init_from), resume)
        }
        _ => anyhow::bail!("the command after `--` must be `train --config …`, not `{}`", command.join(" ")),
    }
}

/// `--init-from X` as the override `train.init_from="X"`, after the others (so it wins), which
/// scheduled jobs pass on with the rest.
fn with_init_from(mut overrides: Vec<String>, init_from: Option<String>) -> Vec<String> {
    overrides.extend(init_from.map(|source| format!("train.init_from={source:?}")));
    overrides
}

/// Builds the model of `cfg` and loads `weights` (safetensors with the reference's names).
fn load_model(cfg: &Config, weights: &Path) -> Result<(trainer::Dit, tch::nn::VarStore, tch::Device)> {
    let device = trainer::device::select_device(cfg.train.device)?;
    let (model, vs) = load_model_on(cfg, weights, device)?;
    Ok((model, vs, device))
}

fn load_model_on(cfg: &Config, weights: &Path, device: tch::Device) -> Result<(trainer::Dit, tch::nn::VarStore)> {
    let mut vs = tch::nn::VarStore::new(device);
    let model = trainer::Dit::build(&mut vs, &cfg.model)?;
    trainer::weights::load_weights(&vs, weights, &cfg.diffusion)?;
    Ok((model, vs))
}

/// Token arrays from a JSONL file (`bd3 sample --format jsonl` output).
fn read_samples(path: &Path) -> Result<Vec<Vec<u32>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            let value: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
            let tokens = value.get("tokens").and_then(|t| t.as_array()).with_context(|| {
                format!("{}:{}: expected an object with a `tokens` array of ids", path.display(), i + 1)
            })?;
            tokens
                .iter()
                .map(|t| t.as_u64().map(|t| t as u32))
                .collect::<Option<Vec<u32>>>()
                .with_context(|| format!("{}:{}: `tokens` must hold non-negative integers", path.display(), i + 1))
        })
        .collect()
}
