//! A simple block-by-block sampler without KV cache (the fast sampler is its own component).
//!
//! BD3-LM: the sequence starts with BOS; each block is appended as L′ `[MASK]` tokens and
//! denoised by first-hitting — every network call samples one uniformly chosen masked position
//! from the SUBS distribution, nucleus-filtered — then committed. The model reads a window of at
//! most `seq_len` tokens ending at the current block, with the block-causal mask (§5.1–5.5).
//! The AR model samples token by token.

use anyhow::{ensure, Result};
use kernels::BlockLayout;
use tch::{Device, Kind, Tensor};

use crate::config::{Arch, Config};
use crate::diffusion::{subs_log_probs, tokens_tensor};
use crate::model::Dit;
use crate::rng::{stream, NoiseRng};

/// GPT-2's `<|endoftext|>`, which is also its BOS.
pub const BOS_ID: u32 = 50256;

/// What a generation produced.
#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    /// Network calls made.
    pub nfe: usize,
}

/// Generates `len` tokens (rounded up to whole blocks for BD3-LM) starting with BOS.
pub fn generate(model: &Dit, cfg: &Config, len: usize, device: Device) -> Result<Generation> {
    ensure!(len >= 2, "generate at least 2 tokens");
    let mut rng = NoiseRng::new(cfg.sample.seed, stream::SAMPLE, 0, 0);
    tch::no_grad(|| match cfg.model.arch {
        Arch::Bd3 => generate_blocks(model, cfg, len, device, &mut rng),
        Arch::Ar => generate_tokens(model, cfg, len, device, &mut rng),
    })
}

fn generate_blocks(model: &Dit, cfg: &Config, len: usize, device: Device, rng: &mut NoiseRng) -> Result<Generation> {
    let bs = cfg.diffusion.block_size;
    let mask = cfg.diffusion.mask_id;
    let window = cfg.model.seq_len / bs * bs;
    let mut seq: Vec<u32> = Vec::with_capacity(len.div_ceil(bs) * bs);
    let mut nfe = 0;
    while seq.len() < len {
        let block_start = seq.len();
        seq.extend(std::iter::repeat_n(mask, bs));
        if block_start == 0 {
            seq[0] = BOS_ID;
        }
        loop {
            let masked: Vec<usize> = (block_start..seq.len()).filter(|&i| seq[i] == mask).collect();
            if masked.is_empty() {
                break;
            }
            let start = seq.len().saturating_sub(window);
            let input = &seq[start..];
            let x = tokens_tensor(input, 1, input.len(), device);
            let layout = BlockLayout::block_causal(input.len(), bs)?;
            // First-hitting: the position to unmask is chosen before the call, so only its
            // logits are needed.
            let pos = masked[rng.below(masked.len())];
            let row = (pos - start) as i64;
            let logits = model.logits_at(&x, &layout, &Tensor::from_slice(&[row]).to_device(device), false)?;
            nfe += 1;
            let log_probs = subs_log_probs(&logits.unsqueeze(0), &x.narrow(1, row, 1), mask);
            seq[pos] = sample_nucleus(&log_probs.reshape([-1]), cfg.sample.nucleus_p, rng)?;
        }
    }
    seq.truncate(len);
    Ok(Generation { tokens: seq, nfe })
}

fn generate_tokens(model: &Dit, cfg: &Config, len: usize, device: Device, rng: &mut NoiseRng) -> Result<Generation> {
    let mut seq = vec![BOS_ID];
    let mut nfe = 0;
    while seq.len() < len {
        let start = seq.len().saturating_sub(cfg.model.seq_len);
        let input = &seq[start..];
        let x = tokens_tensor(input, 1, input.len(), device);
        let logits = model.logits(&x, &BlockLayout::Causal { seq_len: input.len() }, input.len(), false)?;
        nfe += 1;
        let last = logits.get(0).get(input.len() as i64 - 1).to_kind(Kind::Float);
        let _ = last.narrow(0, cfg.diffusion.mask_id as i64, 1).fill_(f64::NEG_INFINITY);
        seq.push(sample_nucleus(&last.log_softmax(-1, Kind::Float), cfg.sample.nucleus_p, rng)?);
    }
    Ok(Generation { tokens: seq, nfe })
}

/// Draws a token from log-probabilities `[vocab]` restricted to the smallest set of most likely
/// tokens whose mass reaches `p` (standard top-p: the token that crosses `p` is kept).
pub fn sample_nucleus(log_probs: &Tensor, p: f64, rng: &mut NoiseRng) -> Result<u32> {
    let probs = Vec::<f64>::try_from(log_probs.to_kind(Kind::Double).exp().to_device(Device::Cpu))?;
    let mut order: Vec<usize> = (0..probs.len()).filter(|&i| probs[i] > 0.0).collect();
    ensure!(!order.is_empty(), "the distribution has no mass");
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let total: f64 = order.iter().map(|&i| probs[i]).sum();
    let mut kept = 0.0;
    let mut cut = order.len();
    for (n, &i) in order.iter().enumerate() {
        kept += probs[i];
        if kept >= p * total {
            cut = n + 1;
            break;
        }
    }
    let mut x = rng.uniform() * kept;
    for &i in &order[..cut] {
        x -= probs[i];
        if x < 0.0 {
            return Ok(i as u32);
        }
    }
    Ok(order[cut - 1] as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nucleus_keeps_the_crossing_token_and_drops_the_tail() {
        let probs = Tensor::from_slice(&[0.5f64, 0.3, 0.15, 0.05]).log();
        let mut rng = NoiseRng::new(0, 0, 0, 0);
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            counts[sample_nucleus(&probs, 0.7, &mut rng).unwrap() as usize] += 1;
        }
        // 0.5 + 0.3 crosses 0.7: tokens 0 and 1 kept, renormalized to 5/8 and 3/8.
        assert_eq!((counts[2], counts[3]), (0, 0));
        let frac = counts[0] as f64 / 4000.0;
        assert!((frac - 0.625).abs() < 0.03, "{frac}");
        assert_eq!(sample_nucleus(&probs, 0.01, &mut rng).unwrap(), 0);
    }
}
