//! bd3's launch backends, shared by the `bd3` command line (src/main.rs) and the tests that start
//! multi-process jobs. The trainer itself knows nothing about how it was started: it reads its
//! rank from the environment the backend set up (trainer::dist).

pub mod k8s;
pub mod local;
pub mod report;
pub mod slurm;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use trainer::Config;

/// The `bd3 train` command a scheduled job runs, with its config loaded and validated on the
/// submitting machine, so that a bad config fails there and not after the job waited in a queue.
#[derive(Debug, Clone)]
pub struct TrainCommand {
    pub config_path: PathBuf,
    pub overrides: Vec<String>,
    /// `--resume` as given (the first run's; a restarted job always resumes with `auto`).
    pub resume: Option<String>,
    /// The resolved config.
    pub config: Config,
}

impl TrainCommand {
    /// Loads and validates the config as `bd3 train` would (the trainer's own loader).
    pub fn load(config_path: PathBuf, overrides: Vec<String>, resume: Option<String>) -> Result<Self> {
        let mut all = overrides.clone();
        if let Some(r) = &resume {
            all.push(format!("checkpoint.resume={r:?}"));
        }
        let config = Config::load(&config_path, &all)?;
        Ok(Self { config_path, overrides, resume, config })
    }

    /// `train --config … --set …`, without `--resume` (each backend adds its own).
    pub fn args_without_resume(&self) -> Vec<String> {
        let mut args = vec!["train".to_string(), "--config".into(), self.config_path.display().to_string()];
        for o in &self.overrides {
            args.extend(["--set".to_string(), o.clone()]);
        }
        args
    }
}

/// What `bd3 train --dry-run` prints: where the run writes, the model, the data, the batch
/// arithmetic, the schedule and where it starts, all from the validated config, without touching
/// data, checkpoints or devices.
pub fn dry_run_summary(cfg: &Config) -> Result<String> {
    use std::fmt::Write;
    let (m, d, t, o) = (&cfg.model, &cfg.diffusion, &cfg.train, &cfg.optim);
    let mut out = String::new();
    let w = &mut out;
    writeln!(w, "config valid; dry run, nothing trained")?;
    writeln!(w, "run          {} (checkpoints: {})", cfg.run_dir().display(), cfg.checkpoint_url())?;
    let objective = match m.arch {
        trainer::config::Arch::Ar => "autoregressive".to_string(),
        _ if d.block_size == m.seq_len => format!("MDLM (block size L' = L = {})", m.seq_len),
        _ => format!("BD3-LM, block size L' = {}", d.block_size),
    };
    writeln!(
        w,
        "model        {} layers x {} hidden x {} heads, vocabulary {}, context L = {}, {} parameters; {objective}",
        m.layers,
        m.hidden,
        m.heads,
        m.vocab_size,
        m.seq_len,
        trainer::plan::parameter_count(cfg)
    )?;
    let clip = if d.clip_search { "clip search at every validation" } else { "no clip search" };
    writeln!(w, "noise        t in [{}, {}], {clip}, mask id {}", d.sampling_eps_min, d.sampling_eps_max, d.mask_id)?;
    let data = if cfg.data.dataset.is_empty() {
        format!("corpus {} (GPT-2 BPE, in memory)", cfg.data.corpus.display())
    } else {
        format!("data set {}", cfg.data.dataset)
    };
    writeln!(w, "data         {data}")?;
    let per_rank = t.micro_batch * t.grad_accum;
    writeln!(
        w,
        "batch        micro-batch {} x accumulation {} = {per_rank} sequences per rank and step; global batch = {per_rank} x ranks",
        t.micro_batch, t.grad_accum
    )?;
    let tokens = t.steps as f64 * per_rank as f64 * m.seq_len as f64;
    writeln!(
        w,
        "schedule     {} steps ({:.3e} tokens per rank), lr {} after {} warm-up steps, EMA decay {}, validation every {} steps",
        t.steps, tokens, o.lr, o.warmup_steps, o.ema_decay, t.eval_every
    )?;
    let resume = String::from(cfg.checkpoint.resume);
    let own = match cfg.checkpoint.resume {
        trainer::config::ResumeFrom::None => {
            "checkpoints of this run are refused (checkpoint.resume = \"none\"; --resume auto resumes them)".to_string()
        }
        _ => format!("a checkpoint of this run is resumed instead (checkpoint.resume = \"{resume}\")"),
    };
    let start = match &t.init_from {
        Some(source) => format!("from the weights of {source} (fresh optimizer, EMA, step and data order); {own}"),
        None => format!("from scratch; {own}"),
    };
    writeln!(w, "start        {start}")?;
    Ok(out)
}

/// `program` in a directory of PATH, as a shell would find it.
pub fn find_program(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// `word` as one word for bash: as it is when it holds only characters the shell leaves alone,
/// otherwise single-quoted.
pub fn shell_quote(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./:=@%+,".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// A spinner with the elapsed time for long work of unknown length, on stderr when it is a
/// terminal (hidden otherwise, so logs and pipes stay clean).
pub fn spinner(message: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner().with_message(message.to_string());
    bar.set_style(ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("a valid template"));
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// A bar over `total` items of `what`, with rate and ETA, on a terminal only.
pub fn counter(total: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    let template = format!("[{{bar:30}}] {{pos}}/{{len}} {what}  {{per_sec}}  ETA {{eta}}");
    bar.set_style(ProgressStyle::with_template(&template).expect("a valid template").progress_chars("=> "));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_keeps_plain_words_and_quotes_the_rest() {
        assert_eq!(shell_quote("configs/tiny.toml"), "configs/tiny.toml");
        assert_eq!(shell_quote("train.device=\"cpu\""), r#"'train.device="cpu"'"#);
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
    }
}
