//! The block-diffusion objective (docs/algorithm.md §2–§3).
//!
//! For a clean batch x_0: draw one masking rate t per (sequence, block) — stratified over the
//! whole batch × blocks and mapped into the clip interval [β, ω] —, mask each token of block b
//! with probability t_b (re-drawing blocks whose masked fraction leaves [β, ω]), keep the first
//! token clean, run the denoiser on x_t ⊕ x_0 in one pass, and score the x_t half with the SUBS
//! parameterisation: ℓ_i = −(1/t_b)·log p_θ(x_0,i | x_t, x_<b) at masked positions, 0 elsewhere,
//! averaged over all tokens.
//!
//! The references it must equal live in the `reference` module: the naive two-pass Algorithm 1 and
//! the full SUBS log-probabilities; for L′ = L it equals MDLM's single pass.

use anyhow::{bail, ensure, Result};
use kernels::BlockLayout;
use tch::{Device, Tensor};

use crate::config::{DiffusionConfig, ModelConfig, MIN_MASK_RATE};
use crate::model::{wide_kind, Dit};
use crate::rng::{stream, NoiseRng};

/// The logit added to `[MASK]` so that its probability is exactly zero (docs/algorithm.md §3.6).
pub(crate) const NEG_INF_LOGIT: f64 = -1e6;
/// Re-draws allowed per block before resampling gives up (an admissible fraction exists, so
/// this only trips on intervals that admit a vanishingly unlikely count).
const MAX_RESAMPLES: usize = 100_000;

/// The interval [β, ω] of masking rates t is drawn from (the clipped schedule, docs/algorithm.md §3.4, §4).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipInterval {
    pub beta: f64,
    pub omega: f64,
}

impl ClipInterval {
    /// The unclipped linear schedule, the one likelihoods are reported on.
    pub const FULL: ClipInterval = ClipInterval { beta: MIN_MASK_RATE, omega: 1.0 };

    /// Which bounds resampling enforces: the lower one only when β is above the default 1e-3,
    /// the upper one only when ω is below 1 (as the reference does).
    fn checks(&self) -> (bool, bool) {
        (self.beta > Self::FULL.beta, self.omega < 1.0)
    }

    /// Whether a block with this fraction of masked tokens is inside the interval.
    pub fn admits(&self, fraction: f64) -> bool {
        let (lower, upper) = self.checks();
        let too_few = lower && fraction < self.beta;
        let too_many = upper && fraction > self.omega;
        !(too_few || too_many)
    }
}

/// One draw of the forward process for a micro-batch: t per block and the noisy tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Noise {
    pub batch: usize,
    pub seq_len: usize,
    pub block_size: usize,
    /// `[batch, seq_len / block_size]`, row-major.
    pub t: Vec<f64>,
    /// `[batch, seq_len]`, row-major.
    pub xt: Vec<u32>,
}

impl Noise {
    pub fn num_blocks(&self) -> usize {
        self.seq_len / self.block_size
    }

    pub fn xt_tensor(&self, device: Device) -> Tensor {
        tokens_tensor(&self.xt, self.batch, self.seq_len, device)
    }

    /// t repeated over every token of its block, `[batch, seq_len]` fp64 (the losses divide by it
    /// in their own kind).
    pub fn t_per_token(&self, device: Device) -> Tensor {
        let per_token: Vec<f64> = self.t.iter().flat_map(|&t| std::iter::repeat_n(t, self.block_size)).collect();
        Tensor::from_slice(&per_token).reshape([self.batch as i64, self.seq_len as i64]).to_device(device)
    }
}

/// `u32` tokens `[batch, len]` as an int64 tensor on `device`.
pub fn tokens_tensor(tokens: &[u32], batch: usize, len: usize, device: Device) -> Tensor {
    let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
    Tensor::from_slice(&ids).reshape([batch as i64, len as i64]).to_device(device)
}

/// `n` uniforms in [0, 1). Antithetic (low-discrepancy) draws put exactly one value in each of
/// the `n` strata [i/n, (i+1)/n), i being the row-major index over (sequence, block) (docs/algorithm.md §3.3).
pub fn stratified_uniform(rng: &mut NoiseRng, n: usize, antithetic: bool) -> Vec<f64> {
    (0..n)
        .map(|i| {
            let u = rng.uniform();
            if antithetic {
                ((u + i as f64) / n as f64).min(1.0 - f64::EPSILON)
            } else {
                u
            }
        })
        .collect()
}

/// Where a micro-batch's rows sit in their training step's global batch, and that step's
/// random numbers: what the noise of a row is a function of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlobalRows {
    pub seed: u64,
    pub step: u64,
    /// Sequences in the global batch (all ranks, all micro-steps).
    pub global: usize,
    /// The global index of the micro-batch's first row.
    pub first: usize,
}

/// The block-diffusion objective for one model shape.
#[derive(Debug, Clone)]
pub struct BlockDiffusion {
    pub seq_len: usize,
    pub block_size: usize,
    pub mask_id: u32,
    pub antithetic: bool,
    pub resample: bool,
    pub ignore_bos: bool,
}

impl BlockDiffusion {
    pub fn new(model: &ModelConfig, cfg: &DiffusionConfig) -> Result<Self> {
        BlockLayout::two_stream(model.seq_len, cfg.block_size)?;
        Ok(Self {
            seq_len: model.seq_len,
            block_size: cfg.block_size,
            mask_id: cfg.mask_id,
            antithetic: cfg.antithetic,
            resample: cfg.resample,
            ignore_bos: cfg.ignore_bos,
        })
    }

    /// Draws t per block and the noisy tokens x_t for clean tokens `x0` `[batch, seq_len]`, all
    /// from `rng`: the t of every block first (stratified over the batch), then the masks.
    pub fn sample_noise(&self, x0: &[u32], batch: usize, clip: ClipInterval, rng: &mut NoiseRng) -> Result<Noise> {
        let n = self.seq_len;
        ensure!(x0.len() == batch * n, "batch of {} tokens is not {batch} × {n}", x0.len());
        let resample = self.resampling(clip)?;
        let t = self.draw_t(rng, batch, clip);
        let mut xt = x0.to_vec();
        for (row, x0_row) in x0.chunks(n).enumerate() {
            self.mask_row(x0_row, &mut xt[row * n..(row + 1) * n], &t[row * self.num_blocks()..], clip, resample, rng)?;
        }
        Ok(Noise { batch, seq_len: n, block_size: self.block_size, t, xt })
    }

    /// The noise of rows `rows.first ..` of a step's global batch, for their clean tokens `x0`:
    /// the same for a row whichever rank trains it and however the batch is cut into
    /// micro-batches. The t of every block is drawn for the whole global batch (stratified over
    /// all of it, which is cheap) from the step's stream; each row's masks come from a stream
    /// of its own, so a rank draws per-token noise only for its rows.
    pub fn sample_noise_of_rows(&self, x0: &[u32], rows: &GlobalRows, clip: ClipInterval) -> Result<Noise> {
        let (n, nb) = (self.seq_len, self.num_blocks());
        ensure!(x0.len() % n == 0, "batch of {} tokens is not a whole number of sequences of {n}", x0.len());
        let batch = x0.len() / n;
        ensure!(
            rows.first + batch <= rows.global,
            "rows {}..{} are not in a global batch of {}",
            rows.first,
            rows.first + batch,
            rows.global
        );
        let resample = self.resampling(clip)?;
        let mut step_rng = NoiseRng::new(rows.seed, stream::TRAIN_NOISE, rows.step, 0);
        let t = self.draw_t(&mut step_rng, rows.global, clip)[rows.first * nb..(rows.first + batch) * nb].to_vec();
        let mut xt = x0.to_vec();
        for (row, x0_row) in x0.chunks(n).enumerate() {
            let mut rng = NoiseRng::new(rows.seed, stream::TRAIN_MASKS, rows.step, (rows.first + row) as u64);
            self.mask_row(x0_row, &mut xt[row * n..(row + 1) * n], &t[row * nb..], clip, resample, &mut rng)?;
        }
        Ok(Noise { batch, seq_len: n, block_size: self.block_size, t, xt })
    }

    fn num_blocks(&self) -> usize {
        self.seq_len / self.block_size
    }

    /// Whether blocks are re-drawn until their masked fraction is inside `clip`; an error when
    /// no fraction k/L′ could be.
    fn resampling(&self, clip: ClipInterval) -> Result<bool> {
        let bs = self.block_size;
        let resample = self.resample && clip != ClipInterval::FULL && {
            let (lower, upper) = clip.checks();
            lower || upper
        };
        if resample && !(0..=bs).any(|k| clip.admits(k as f64 / bs as f64)) {
            bail!("clip interval [{}, {}] admits no masked fraction k/{bs} for block size {bs}", clip.beta, clip.omega);
        }
        Ok(resample)
    }

    /// t of every block of `rows` sequences, stratified over all of them, inside [β, ω].
    fn draw_t(&self, rng: &mut NoiseRng, rows: usize, clip: ClipInterval) -> Vec<f64> {
        stratified_uniform(rng, rows * self.num_blocks(), self.antithetic)
            .into_iter()
            .map(|u| clip.beta + (clip.omega - clip.beta) * u)
            .collect()
    }

    /// Masks each block of one sequence with its t (`t` starts at the row's first block), block
    /// by block, re-drawing a block whose masked fraction `clip` does not admit; the first
    /// token stays clean with `ignore_bos`.
    fn mask_row(
        &self,
        x0: &[u32],
        xt: &mut [u32],
        t: &[f64],
        clip: ClipInterval,
        resample: bool,
        rng: &mut NoiseRng,
    ) -> Result<()> {
        let bs = self.block_size;
        for (blk, &tb) in t.iter().take(self.num_blocks()).enumerate() {
            let span = blk * bs..(blk + 1) * bs;
            for attempt in 0.. {
                let mut masked = 0;
                for i in span.clone() {
                    let hit = rng.uniform() <= tb;
                    masked += usize::from(hit);
                    xt[i] = if hit { self.mask_id } else { x0[i] };
                }
                if !resample || clip.admits(masked as f64 / bs as f64) {
                    break;
                }
                ensure!(
                    attempt < MAX_RESAMPLES,
                    "resampling block {blk} (t = {tb}) did not reach [{}, {}]",
                    clip.beta,
                    clip.omega
                );
            }
        }
        if self.ignore_bos {
            xt[0] = x0[0];
        }
        Ok(())
    }

    /// The training loss: the mean of [`Self::token_losses`] over all tokens (docs/algorithm.md §3.7).
    pub fn loss(&self, model: &Dit, x0: &Tensor, noise: &Noise, train: bool) -> Result<Tensor> {
        let terms = self.token_losses(model, x0, noise, train)?;
        Ok(terms.mean(terms.kind()))
    }

    /// Per-token losses `[batch, seq_len]`. With L′ = L the clean stream carries no information
    /// the noisy half can see, so MDLM's single pass over x_t gives the same values at half
    /// the cost.
    pub fn token_losses(&self, model: &Dit, x0: &Tensor, noise: &Noise, train: bool) -> Result<Tensor> {
        if self.block_size == self.seq_len {
            self.token_losses_single_stream(model, x0, noise, train)
        } else {
            self.token_losses_two_stream(model, x0, noise, train)
        }
    }

    /// The vectorized pass over x_t ⊕ x_0 with the three-part mask (docs/algorithm.md §2.1–2.4).
    pub fn token_losses_two_stream(&self, model: &Dit, x0: &Tensor, noise: &Noise, train: bool) -> Result<Tensor> {
        let input = Tensor::cat(&[&noise.xt_tensor(x0.device()), x0], 1);
        self.masked_terms(model, &input, &BlockLayout::two_stream(self.seq_len, self.block_size)?, x0, noise, train)
    }

    /// MDLM: one bidirectional pass over x_t alone.
    pub fn token_losses_single_stream(&self, model: &Dit, x0: &Tensor, noise: &Noise, train: bool) -> Result<Tensor> {
        let input = noise.xt_tensor(x0.device());
        self.masked_terms(model, &input, &BlockLayout::block_causal(self.seq_len, self.seq_len)?, x0, noise, train)
    }

    /// The loss terms `[batch, seq_len]`, with logits computed only at masked positions (the
    /// others contribute exactly 0 under SUBS). The x_t half is the first `seq_len` positions
    /// of every row of `input`.
    fn masked_terms(
        &self,
        model: &Dit,
        input: &Tensor,
        layout: &BlockLayout,
        x0: &Tensor,
        noise: &Noise,
        train: bool,
    ) -> Result<Tensor> {
        let (batch, n, device) = (noise.batch, noise.seq_len, x0.device());
        let masked: Vec<i64> =
            noise.xt.iter().enumerate().filter(|&(_, &tok)| tok == self.mask_id).map(|(i, _)| i as i64).collect();
        if masked.is_empty() {
            // Nothing to predict; the dense path still yields a loss with a graph.
            let logits = model.logits(input, layout, n, train)?;
            return Ok(self.nelbo_terms(&logits, x0, &noise.xt_tensor(device), &noise.t_per_token(device)));
        }
        let input_len = layout.query_len() as i64;
        let rows: Vec<i64> = masked.iter().map(|&i| i / n as i64 * input_len + i % n as i64).collect();
        let t: Vec<f64> = masked.iter().map(|&i| noise.t[i as usize / noise.block_size]).collect();
        let (masked, rows) =
            (Tensor::from_slice(&masked).to_device(device), Tensor::from_slice(&rows).to_device(device));
        let logits = model.logits_at(input, layout, &rows, train)?;
        let log_probs = log_probs_without_mask(&logits, self.mask_id);
        let kind = log_probs.kind();
        let target = x0.reshape([-1]).index_select(0, &masked);
        let t = Tensor::from_slice(&t).to_kind(kind).to_device(device);
        let values = -log_probs.gather(1, &target.unsqueeze(1), false).squeeze_dim(1) / t;
        let terms = Tensor::zeros([(batch * n) as i64], (kind, device)).index_add(0, &masked, &values);
        Ok(terms.reshape([batch as i64, n as i64]))
    }

    /// −(1/t)·log p(x_0 | …) under SUBS from full logits `[batch, len, vocab]`, gathering the
    /// target's log-probability instead of materializing the carry-over rows: at unmasked
    /// positions SUBS gives x_t = x_0 log-probability 0, so the term is 0 there.
    pub(crate) fn nelbo_terms(&self, logits: &Tensor, x0: &Tensor, xt: &Tensor, t: &Tensor) -> Tensor {
        let log_probs = log_probs_without_mask(logits, self.mask_id);
        let kind = log_probs.kind();
        let target = log_probs.gather(2, &x0.unsqueeze(2), false).squeeze_dim(2);
        let masked = xt.eq(self.mask_id as i64).to_kind(kind);
        -(target * masked) / t.to_kind(kind)
    }
}

/// logits + (−1e6 at `[MASK]`): the model never predicts the mask token. In fp32 at least
/// ([`wide_kind`]).
pub fn mask_logit_removed(logits: &Tensor, mask_id: u32) -> Tensor {
    let vocab = *logits.size().last().expect("logits have a vocabulary axis");
    let kind = wide_kind(logits.kind());
    let bias = Tensor::zeros([vocab], (kind, logits.device()));
    let _ = bias.narrow(0, mask_id as i64, 1).fill_(NEG_INF_LOGIT);
    logits.to_kind(kind) + bias
}

/// Log-probabilities over the vocabulary with zero mass on `[MASK]`, in fp32 at least.
pub fn log_probs_without_mask(logits: &Tensor, mask_id: u32) -> Tensor {
    let removed = mask_logit_removed(logits, mask_id);
    let kind = removed.kind();
    removed.log_softmax(-1, kind)
}

/// Next-token losses `[batch, len − 1]` of the AR model (docs/algorithm.md §1.8): input x[:, :-1], targets
/// x[:, 1:], the mask token's logit removed.
pub fn ar_token_losses(model: &Dit, x0: &Tensor, mask_id: u32, train: bool) -> Result<Tensor> {
    let (_, len) = x0.size2()?;
    let input = x0.narrow(1, 0, len - 1);
    let logits = model.logits(&input, &BlockLayout::Causal { seq_len: len as usize - 1 }, len as usize - 1, train)?;
    let log_probs = log_probs_without_mask(&logits, mask_id);
    Ok(-log_probs.gather(2, &x0.narrow(1, 1, len - 1).unsqueeze(2), false).squeeze_dim(2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn objective(seq_len: usize, block_size: usize, resample: bool) -> BlockDiffusion {
        BlockDiffusion { seq_len, block_size, mask_id: 99, antithetic: true, resample, ignore_bos: true }
    }

    #[test]
    fn antithetic_draws_fill_every_stratum_once() {
        let mut rng = NoiseRng::new(3, 0, 0, 0);
        for n in [1usize, 7, 64, 1000] {
            let u = stratified_uniform(&mut rng, n, true);
            let mut strata: Vec<usize> = u.iter().map(|x| (x * n as f64).floor() as usize).collect();
            assert!(strata.iter().enumerate().all(|(i, &s)| i == s), "row-major stratum order");
            strata.dedup();
            assert_eq!(strata.len(), n);
        }
    }

    #[test]
    fn resampling_keeps_every_block_inside_the_interval() {
        for (bs, clip) in [(4, ClipInterval { beta: 0.45, omega: 0.95 }), (16, ClipInterval { beta: 0.3, omega: 0.8 })]
        {
            let mut obj = objective(64, bs, true);
            obj.ignore_bos = false;
            let x0: Vec<u32> = (0..8 * 64).map(|i| (i % 50) as u32).collect();
            let noise = obj.sample_noise(&x0, 8, clip, &mut NoiseRng::new(1, 0, 0, 0)).unwrap();
            for (blk, &t) in noise.t.iter().enumerate() {
                assert!(t >= clip.beta && t <= clip.omega, "t = {t}");
                let masked = noise.xt[blk * bs..(blk + 1) * bs].iter().filter(|&&x| x == 99).count();
                assert!(clip.admits(masked as f64 / bs as f64), "block {blk}: {masked}/{bs} masked, t = {t}");
            }
            // Without resampling the same draw leaves some blocks outside (the test has teeth).
            obj.resample = false;
            let noise = obj.sample_noise(&x0, 8, clip, &mut NoiseRng::new(1, 0, 0, 0)).unwrap();
            let outside =
                noise.xt.chunks(bs).filter(|b| !clip.admits(b.iter().filter(|&&x| x == 99).count() as f64 / bs as f64));
            assert!(outside.count() > 0);
        }
    }

    #[test]
    fn impossible_intervals_are_refused() {
        let obj = objective(8, 1, true);
        let err = obj.sample_noise(&[0; 8], 1, ClipInterval { beta: 0.3, omega: 0.8 }, &mut NoiseRng::new(0, 0, 0, 0));
        assert!(err.unwrap_err().to_string().contains("admits no masked fraction"));
    }

    #[test]
    fn full_masking_and_the_clean_first_token() {
        let obj = objective(16, 4, true);
        let x0: Vec<u32> = (1..=32).collect();
        let noise =
            obj.sample_noise(&x0, 2, ClipInterval { beta: 1.0, omega: 1.0 }, &mut NoiseRng::new(0, 0, 0, 0)).unwrap();
        for (i, &tok) in noise.xt.iter().enumerate() {
            let expected = if i % 16 == 0 { x0[i] } else { 99 };
            assert_eq!(tok, expected, "position {i}");
        }
        assert!(noise.t.iter().all(|&t| t == 1.0));
    }

    #[test]
    fn subs_zeroes_unmasked_positions_and_the_mask_token() {
        tch::manual_seed(0);
        let (b, l, v) = (2, 6, 100);
        let logits = Tensor::randn([b, l, v], (Kind::Float, Device::Cpu)) * 3.0;
        let xt = Tensor::from_slice(&[5i64, 99, 7, 99, 99, 1, 99, 3, 99, 4, 2, 99]).reshape([b, l]);
        let x0 = Tensor::from_slice(&[5i64, 6, 7, 8, 9, 1, 0, 3, 11, 4, 2, 12]).reshape([b, l]);
        let lp = crate::reference::subs_log_probs(&logits, &xt, 99);
        let mask_prob = lp.select(2, 99).exp();
        assert_eq!(mask_prob.abs().max().double_value(&[]), 0.0, "[MASK] has probability 0");
        let at_input = lp.gather(2, &xt.clamp_max(v - 1).unsqueeze(2), false).squeeze_dim(2);
        let unmasked = xt.ne(99);
        assert_eq!(at_input.masked_select(&unmasked).abs().max().double_value(&[]), 0.0, "carry-over");
        let t = Tensor::full([b, l], 0.5, (Kind::Float, Device::Cpu));
        let obj = objective(l as usize, 2, false);
        let terms = obj.nelbo_terms(&logits, &x0, &xt, &t);
        assert_eq!(terms.masked_select(&unmasked).abs().max().double_value(&[]), 0.0, "no loss where unmasked");
        let expected = -lp.gather(2, &x0.unsqueeze(2), false).squeeze_dim(2) / &t;
        let at_masked = |x: &Tensor| x.masked_select(&unmasked.logical_not());
        // The same log-softmax and the same division: the same bits.
        assert!(at_masked(&terms).equal(&at_masked(&expected)));
    }
}
