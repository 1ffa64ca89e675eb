//! The loss a model is trained with: block diffusion (docs/algorithm.md §2–§3) or next-token
//! prediction for the AR baseline (docs/algorithm.md §1.8).

use std::ops::Range;

use anyhow::Result;
use tch::Tensor;

use crate::config::{Arch, Config};
use crate::diffusion::{ar_token_losses, tokens_tensor, BlockDiffusion, ClipInterval};
use crate::model::Dit;
use crate::rng::NoiseRng;

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
