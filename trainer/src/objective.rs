//! The loss a model is trained with: block diffusion (docs/algorithm.md §2–§3) or next-token
//! prediction for the AR baseline (docs/algorithm.md §1.8).

use anyhow::Result;
use tch::Tensor;

use crate::config::{Arch, Config};
use crate::diffusion::{ar_token_losses, tokens_tensor, BlockDiffusion, ClipInterval, GlobalRows};
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
        let device = model.device();
        let len = tokens.len() / batch;
        match self {
            Self::Diffusion(obj) => {
                let noise = obj.sample_noise(tokens, batch, clip, rng)?;
                obj.token_losses(model, &tokens_tensor(tokens, batch, len, device), &noise, train)
            }
            Self::Autoregressive { mask_id } => {
                ar_token_losses(model, &tokens_tensor(tokens, batch, len, device), *mask_id, train)
            }
        }
    }

    /// [`Objective::token_losses`] of a training micro-batch: the rows `rows` of a step's global
    /// batch, each with the noise of its global row (`BlockDiffusion::sample_noise_of_rows`), so
    /// that a row's loss does not depend on the number of ranks or micro-steps.
    pub fn token_losses_of_rows(
        &self,
        model: &Dit,
        tokens: &[u32],
        batch: usize,
        rows: &GlobalRows,
        clip: ClipInterval,
    ) -> Result<Tensor> {
        let x0 = tokens_tensor(tokens, batch, tokens.len() / batch, model.device());
        match self {
            Self::Diffusion(obj) => obj.token_losses(model, &x0, &obj.sample_noise_of_rows(tokens, rows, clip)?, true),
            Self::Autoregressive { mask_id } => ar_token_losses(model, &x0, *mask_id, true),
        }
    }
}
