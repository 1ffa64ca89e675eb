//! `bd3 ckpt …`: list, inspect, verify, export and import checkpoints.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use checkpoint::{CheckpointStore, Manifest};
use clap::Subcommand;
use trainer::Config;

#[derive(Subcommand)]
pub enum Ckpt {
    /// The steps under a checkpoint location, committed or not.
    Ls {
        /// A local path or object-store URL (s3://bucket/prefix, …).
        url: String,
    },
    /// What one checkpoint holds: step, tokens, world size, files, progress (and tensors).
    Inspect {
        url: String,
        /// A step number (default: the latest committed step).
        #[arg(long)]
        step: Option<u64>,
        /// Also list every tensor with its dtype, shape and pieces.
        #[arg(long)]
        tensors: bool,
    },
    /// Checks sizes and checksums of every file of a step (default: every committed step).
    Verify {
        url: String,
        #[arg(long)]
        step: Option<u64>,
    },
    /// Writes the EMA weights (or --raw weights) of a step to one safetensors file with the
    /// reference's parameter names, for `bd3 sample --weights` or other tools.
    Export {
        url: String,
        #[arg(long)]
        step: Option<u64>,
        #[arg(long)]
        out: PathBuf,
        /// The raw (non-EMA) weights.
        #[arg(long)]
        raw: bool,
    },
    /// Makes a checkpoint from a safetensors file of weights (an export, or published BD3-LM
    /// weights), to sample, evaluate or fine-tune from (`bd3 train --resume auto`).
    Import {
        file: PathBuf,
        url: String,
        #[arg(long, default_value_t = 0)]
        step: u64,
        /// Check every key and shape against the model this config builds, and record it.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long = "set", value_name = "SECTION.FIELD=VALUE")]
        overrides: Vec<String>,
    },
}

fn manifest_at(store: &CheckpointStore, step: Option<u64>) -> Result<Manifest> {
    let step = match step {
        Some(s) => s,
        None => *store
            .committed_steps()?
            .last()
            .with_context(|| format!("{} holds no committed checkpoint", store.url()))?,
    };
    store.manifest(step)
}

pub fn run(command: Ckpt) -> Result<()> {
    match command {
        Ckpt::Ls { url } => {
            let store = CheckpointStore::open(&url)?;
            println!("{:>12}  {:<11}  {:>12}  {:>14}", "step", "state", "bytes", "tokens seen");
            for s in store.steps()? {
                if s.committed {
                    let m = store.manifest(s.step)?;
                    println!(
                        "{:>12}  {:<11}  {:>12}  {:>14}",
                        s.step,
                        "committed",
                        m.total_bytes(),
                        m.meta.tokens_seen
                    );
                } else {
                    println!("{:>12}  {:<11}  {:>12}  {:>14}", s.step, "incomplete", "-", "-");
                }
            }
        }
        Ckpt::Inspect { url, step, tensors } => {
            let store = CheckpointStore::open(&url)?;
            let m = manifest_at(&store, step)?;
            println!("step            {}", m.step);
            println!("tokens seen     {}", m.meta.tokens_seen);
            println!("world size      {}", m.world_size);
            println!("format version  {} (written by {})", m.format_version, m.writer);
            println!("git commit      {}", m.meta.git_commit);
            println!("config hash     {}", m.meta.config_hash);
            println!("files           {} ({} bytes)", m.files.len(), m.total_bytes());
            println!("tensors         {}", m.tensors.len());
            for (k, v) in &m.meta.state {
                println!("{k:<15} {v}");
            }
            if tensors {
                for (name, e) in &m.tensors {
                    println!("  {name}  {:?}{:?}  {} piece(s)", e.dtype, e.shape, e.pieces.len());
                }
            }
        }
        Ckpt::Verify { url, step } => {
            let store = CheckpointStore::open(&url)?;
            let steps = match step {
                Some(s) => vec![s],
                None => store.committed_steps()?,
            };
            let mut bad = 0;
            let bar = launcher::counter(steps.len() as u64, "checkpoints verified");
            for s in steps {
                let verified = store.manifest(s).and_then(|m| store.verify(&m));
                bar.inc(1);
                match verified {
                    Ok(()) => bar.suspend(|| println!("step {s}: ok")),
                    Err(e) => {
                        bad += 1;
                        bar.suspend(|| println!("step {s}: BAD: {e:#}"));
                    }
                }
            }
            bar.finish_and_clear();
            if bad > 0 {
                bail!("{bad} checkpoint(s) failed verification");
            }
        }
        Ckpt::Export { url, step, out, raw } => {
            let store = CheckpointStore::open(&url)?;
            let m = manifest_at(&store, step)?;
            let busy = launcher::spinner(&format!("verifying and exporting step {}", m.step));
            store.verify(&m)?;
            let n = trainer::weights::export_weights(&store, &m, raw, &out)?;
            busy.finish_and_clear();
            let which = if raw { "raw" } else { "EMA" };
            println!("wrote {n} tensors ({which} weights of step {}) to {}", m.step, out.display());
        }
        Ckpt::Import { file, url, step, config, overrides } => {
            let cfg = config.map(|c| Config::load(&c, &overrides)).transpose()?;
            let store = CheckpointStore::open(&url)?;
            if store.committed_steps()?.contains(&step) {
                bail!("{url} already holds step {step}; choose another --step or location");
            }
            let busy = launcher::spinner(&format!("importing {}", file.display()));
            let m = trainer::weights::import_weights(&file, &store, step, cfg.as_ref())?;
            busy.finish_and_clear();
            println!("imported {} tensors from {} as step {step} of {url}", m.tensors.len() / 2, file.display());
        }
    }
    Ok(())
}
