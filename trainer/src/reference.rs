//! Slow, obvious references that the fast paths are tested against (and nothing else uses):
//! the naive two-pass Algorithm 1 and the pass with logits everywhere for the vectorized
//! objective, and the SUBS log-probabilities materialized in full for the gathered NELBO terms.

use anyhow::Result;
use kernels::BlockLayout;
use tch::Tensor;

use crate::diffusion::{log_probs_without_mask, BlockDiffusion, Noise, NEG_INF_LOGIT};
use crate::model::Dit;

/// The references of the vectorized objective (`crate::diffusion`).
impl BlockDiffusion {
    /// Algorithm 1 as written: a clean block-causal pass produces every layer's keys/values,
    /// then each noisy block attends to its own tokens plus the clean keys/values of earlier
    /// blocks. The slow, obvious reference for the vectorized pass.
    pub fn token_losses_naive(&self, model: &Dit, x0: &Tensor, noise: &Noise, train: bool) -> Result<Tensor> {
        let xt = noise.xt_tensor(x0.device());
        let clean = model.clean_kv(x0, self.block_size, train)?;
        let bs = self.block_size as i64;
        let logits: Vec<Tensor> = (0..noise.num_blocks() as i64)
            .map(|b| {
                let prefix: Vec<_> = clean.iter().map(|l| l.narrow(0, b * bs)).collect();
                model.logits_with_prefix(&xt.narrow(1, b * bs, bs), &prefix, train)
            })
            .collect::<Result<_>>()?;
        let logits = Tensor::cat(&logits, 1);
        Ok(self.nelbo_terms(&logits, x0, &xt, &noise.t_per_token(x0.device())))
    }

    /// The vectorized pass with logits at every x_t position, as the authors' code computes them:
    /// the baseline that computing logits only at masked positions is measured and tested against.
    pub fn token_losses_two_stream_dense(
        &self,
        model: &Dit,
        x0: &Tensor,
        noise: &Noise,
        train: bool,
    ) -> Result<Tensor> {
        let xt = noise.xt_tensor(x0.device());
        let layout = BlockLayout::two_stream(self.seq_len, self.block_size)?;
        let logits = model.logits(&Tensor::cat(&[&xt, x0], 1), &layout, self.seq_len, train)?;
        Ok(self.nelbo_terms(&logits, x0, &xt, &noise.t_per_token(x0.device())))
    }
}

/// The SUBS parameterisation (docs/algorithm.md §3.6): log-probabilities `[batch, len, vocab]` with zero mass on
/// `[MASK]`, and "carry-over" rows (log-probability 0 on x_t, −1e6 elsewhere) wherever x_t is
/// not masked.
pub fn subs_log_probs(logits: &Tensor, xt: &Tensor, mask_id: u32) -> Tensor {
    let vocab = *logits.size().last().expect("logits have a vocabulary axis");
    let log_probs = log_probs_without_mask(logits, mask_id);
    let carry = (xt.one_hot(vocab).to_kind(log_probs.kind()) - 1.0) * -NEG_INF_LOGIT;
    let unmasked = xt.ne(mask_id as i64).unsqueeze(2);
    log_probs.where_self(&unmasked.logical_not(), &carry)
}
