//! The loss a model is trained with: block diffusion (docs/algorithm.md §2–§3) or next-token
//! prediction for the AR baseline (docs/algorithm.md §1.8).

use anyhow::Result;
use tch::Tensor;

use crate::config::{Arch, Config};
use crate::diffusion::{ar_token_losses, tokens_tensor, BlockDiffusion, ClipInterval, GlobalRows};
use crate::model::Dit;
use crate::rng::NoiseRng;

/// The loss a model is trained with, and the padding positions it leaves out.
pub struct Objective {
    pub loss: Loss,
    /// The padding id of a data set prepared with `--framing pad` (one document per sequence,
    /// filled with `[PAD]`): loss terms at its positions are 0 and not counted, as the
    /// reference's attention mask does for unpacked LM1B. `None`: every position counts.
    pub pad_id: Option<u32>,
}

/// Block diffusion or next-token prediction.
pub enum Loss {
    Diffusion(BlockDiffusion),
    Autoregressive { mask_id: u32 },
}

impl Objective {
    pub fn new(cfg: &Config) -> Result<Self> {
        let loss = match cfg.model.arch {
            Arch::Bd3 => Loss::Diffusion(BlockDiffusion::new(&cfg.model, &cfg.diffusion)?),
            Arch::Ar => Loss::Autoregressive { mask_id: cfg.diffusion.mask_id },
        };
        Ok(Self { loss, pad_id: crate::data::padding_id(cfg)? })
    }

    /// The block-diffusion objective; `None` for the AR model.
    pub fn diffusion(&self) -> Option<&BlockDiffusion> {
        match &self.loss {
            Loss::Diffusion(obj) => Some(obj),
            Loss::Autoregressive { .. } => None,
        }
    }

    /// Per-token losses of a micro-batch `[batch, len]` of clean tokens, with noise drawn
    /// from `rng` (`[batch, len − 1]` for the AR model, which predicts tokens 1..len); 0 at
    /// padding positions.
    pub fn token_losses(
        &self,
        model: &Dit,
        tokens: &[u32],
        batch: usize,
        clip: ClipInterval,
        rng: &mut NoiseRng,
        train: bool,
    ) -> Result<Tensor> {
        let x0 = tokens_tensor(tokens, batch, tokens.len() / batch, model.device());
        let terms = match &self.loss {
            Loss::Diffusion(obj) => {
                let noise = obj.sample_noise(tokens, batch, clip, rng)?;
                obj.token_losses(model, &x0, &noise, train)?
            }
            Loss::Autoregressive { mask_id } => ar_token_losses(model, &x0, *mask_id, train)?,
        };
        Ok(self.without_padding(terms, &x0))
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
        let terms = match &self.loss {
            Loss::Diffusion(obj) => {
                obj.token_losses(model, &x0, &obj.sample_noise_of_rows(tokens, rows, clip)?, true)?
            }
            Loss::Autoregressive { mask_id } => ar_token_losses(model, &x0, *mask_id, true)?,
        };
        Ok(self.without_padding(terms, &x0))
    }

    /// How many of [`Objective::token_losses`]' terms of `tokens` (`batch` rows) count: all of
    /// them (`[batch, len]`, or `[batch, len − 1]` for AR's targets 1..len) less the padding
    /// positions. With `from_position_1`, position 0 (never masked, not counted in evaluation,
    /// docs/algorithm.md §3.5) is left out too.
    pub fn counted_terms(&self, tokens: &[u32], batch: usize, from_position_1: bool) -> usize {
        let len = tokens.len() / batch;
        let first = usize::from(from_position_1 || matches!(self.loss, Loss::Autoregressive { .. }));
        tokens.chunks(len).map(|row| row[first..].iter().filter(|&&t| Some(t) != self.pad_id).count()).sum()
    }

    /// Zeroes the terms at padding positions (the last `terms.size()[1]` positions of `x0`).
    fn without_padding(&self, terms: Tensor, x0: &Tensor) -> Tensor {
        let Some(pad) = self.pad_id else { return terms };
        let (len, cols) = (x0.size()[1], terms.size()[1]);
        let kept = x0.narrow(1, len - cols, cols).ne(pad as i64);
        terms.where_self(&kept, &terms.zeros_like())
    }
}
