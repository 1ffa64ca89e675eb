//! Validation during training: the NELBO of the held-out split and, for BD3-LM with
//! `diffusion.clip_search`, the data-driven clip search (docs/algorithm.md §4.2, §6.1).

use anyhow::Result;

use crate::config::Config;
use crate::diffusion::ClipInterval;
use crate::dist::Communicator;
use crate::eval::{self, EvalBatches, NelboReport};
use crate::model::Dit;
use crate::objective::Objective;

/// What one validation measured.
pub struct Validation {
    pub nelbo: NelboReport,
    /// The clip search's winner and its mean per-batch variance, when it ran.
    pub clip: Option<(ClipInterval, f64)>,
}

/// Validation NELBO over the split (or its first `train.eval_batches` batches) and, for BD3-LM
/// with `diffusion.clip_search`, the clip search over its first `clip_search_batches` batches;
/// the batches are shared out over `comm`'s ranks, and every rank gets the 1-rank numbers.
pub fn validation(
    model: &Dit,
    objective: &Objective,
    valid: &[u32],
    cfg: &Config,
    comm: &dyn Communicator,
) -> Result<Validation> {
    let batches = EvalBatches {
        seq_len: cfg.model.seq_len,
        micro_batch: cfg.train.micro_batch,
        max_batches: cfg.train.eval_batches,
    };
    let nelbo = eval::nelbo(model, objective, valid, batches, cfg.train.seed, comm)?;
    let clip = match objective.diffusion() {
        Some(obj) if cfg.diffusion.clip_search => {
            let d = &cfg.diffusion;
            let candidates = eval::clip_candidates(d.block_size, &d.clip_search_widths, d.clip_search_delta);
            let batches = EvalBatches { max_batches: d.clip_search_batches.max(1), ..batches };
            eval::clip_search(model, obj, valid, batches, candidates, cfg.train.seed, comm)?.best()
        }
        _ => None,
    };
    Ok(Validation { nelbo, clip })
}
