//! Generation (docs/algorithm.md §5): block by block for BD3-LM, token by token for the AR model.
//!
//! A BD3-LM sequence starts with BOS; each block is appended as L′ `[MASK]` tokens, denoised, then
//! committed. The denoiser sees a window of at most `seq_len` tokens ending at the current block.
//! Two interchangeable contexts provide its logits:
//! * [`Cached`]: per-layer post-RoPE keys/values of committed blocks; a denoising call computes
//!   queries for the current block only;
//! * [`Uncached`]: the reference — the whole window recomputed with the block-causal mask.
//!
//! Denoising is first-hitting (one uniformly chosen masked position per network call) or ancestral
//! with T steps; since the denoiser does not depend on t, its output is reused without a network
//! call while nothing changed. All random numbers come from one seeded stream whose use does not
//! depend on which context or reuse setting runs, so they produce the same tokens — up to
//! `seq_len`: once the window slides, the cache keeps keys/values computed while older blocks
//! were visible (as the reference's cache does), which a recomputed window cannot reproduce.

use std::time::Instant;

use anyhow::{ensure, Result};
use kernels::BlockLayout;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

pub use crate::config::{Algorithm, NucleusRule};
use crate::config::{Arch, Config};
use crate::model::{Dit, Heads, LayerKv, VocabProjection};
use crate::rng::{stream, NoiseRng};

pub use dataloader::manifest::SpecialIds;
/// GPT-2's `<|endoftext|>`: the BOS and EOS ids where neither the config nor the data set names
/// others (the data loader's one definition of it).
pub use dataloader::tokenizer::EOS_ID;
/// The entropy rule (docs/algorithm.md §5.7): stop when the unigram entropy of the last 256 tokens is below 4 nats.
pub const ENTROPY_WINDOW: usize = 256;
pub const ENTROPY_MIN_NATS: f64 = 4.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Length,
    Eos,
    LowEntropy,
}

/// Everything a generation needs besides the model.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    /// Tokens per sequence, BOS included (the cap in variable-length mode).
    pub len: usize,
    pub batch: usize,
    pub algorithm: Algorithm,
    /// T for the ancestral sampler.
    pub steps: usize,
    pub kv_cache: bool,
    /// Reuse the denoiser output while the sequence did not change (ancestral).
    pub reuse_outputs: bool,
    pub var_length: bool,
    pub nucleus_p: f64,
    pub nucleus_rule: NucleusRule,
    pub temperature: f64,
    pub seed: u64,
    /// Every sequence starts with `ids.bos`; `ids.eos` ends a variable-length one.
    pub ids: SpecialIds,
}

impl SampleOptions {
    /// The `[sample]` settings, with the BOS/EOS ids of `data.bos_id/eos_id` or GPT-2's
    /// (use [`SampleOptions::for_run`] to take them from the data set's `index.json` too).
    pub fn from_config(cfg: &Config, len: usize) -> Self {
        let s = &cfg.sample;
        let ids = SpecialIds { bos: cfg.data.bos_id.unwrap_or(EOS_ID), eos: cfg.data.eos_id.unwrap_or(EOS_ID) };
        Self {
            len,
            batch: s.batch,
            algorithm: s.algorithm,
            steps: s.steps,
            kv_cache: s.kv_cache,
            reuse_outputs: true,
            var_length: s.var_length,
            nucleus_p: s.nucleus_p,
            nucleus_rule: s.nucleus_rule,
            temperature: s.temperature,
            seed: s.seed,
            ids,
        }
    }

    /// [`SampleOptions::from_config`] with the ids of `crate::data::special_ids` (the config's,
    /// the data set's or GPT-2's), checked against the model's vocabulary.
    pub fn for_run(cfg: &Config, len: usize) -> Result<Self> {
        Ok(Self { ids: crate::data::special_ids(cfg)?, ..Self::from_config(cfg, len) })
    }
}

/// One generated sequence.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    pub tokens: Vec<u32>,
    pub stop: StopReason,
}

/// What a generation produced.
#[derive(Debug, Clone)]
pub struct Generation {
    pub samples: Vec<Sample>,
    /// Denoising network calls (the store passes that fill the KV cache are not counted, as in
    /// the reference); every call changes the sequence.
    pub nfe: usize,
    /// Positions unmasked after each network call, summed over the batch.
    pub unmasked_per_call: Vec<usize>,
    pub seconds: f64,
}

impl Generation {
    /// Generated tokens (BOS excluded) per second over the whole batch.
    pub fn tokens_per_s(&self) -> f64 {
        let tokens: usize = self.samples.iter().map(|s| s.tokens.len().saturating_sub(1)).sum();
        tokens as f64 / self.seconds.max(1e-9)
    }
}

/// Generates `opts.batch` sequences.
pub fn generate(model: &Dit, cfg: &Config, opts: &SampleOptions, device: Device) -> Result<Generation> {
    ensure!(opts.len >= 2, "generate at least 2 tokens");
    ensure!(opts.batch >= 1, "sample.batch must be at least 1");
    ensure!(opts.temperature > 0.0, "sample.temperature must be positive");
    // An id the embedding cannot hold would fail deep inside libtorch; say which one it is.
    let vocab = cfg.model.vocab_size;
    for (name, id) in
        [("BOS", opts.ids.bos), ("EOS", opts.ids.eos), ("[MASK] (diffusion.mask_id)", cfg.diffusion.mask_id)]
    {
        ensure!(
            (id as usize) < vocab,
            "sampling uses the {name} id {id}, which is not below model.vocab_size ({vocab}): set data.bos_id / \
             data.eos_id (or prepare the data set with its tokenizer's ids)"
        );
    }
    let started = Instant::now();
    let mut rng = NoiseRng::new(opts.seed, stream::SAMPLE, 0, 0);
    let mut generation = tch::no_grad(|| {
        let projection = model.vocab_projection();
        match cfg.model.arch {
            Arch::Bd3 => {
                let block_size = cfg.diffusion.block_size;
                let window = cfg.model.seq_len / block_size * block_size;
                let mut context: Box<dyn BlockContext> = if opts.kv_cache {
                    let cache = KvCache::new(window - block_size);
                    Box::new(Cached { model, projection: &projection, cache, position: 0 })
                } else {
                    let max_context = window - block_size;
                    Box::new(Uncached {
                        model,
                        projection: &projection,
                        committed: Vec::new(),
                        block_size,
                        max_context,
                    })
                };
                generate_blocks(context.as_mut(), cfg, opts, device, &mut rng)
            }
            Arch::Ar => generate_tokens(model, &projection, cfg, opts, device, &mut rng),
        }
    })?;
    generation.seconds = started.elapsed().as_secs_f64();
    Ok(generation)
}

/// Where a block denoiser gets its logits from.
trait BlockContext {
    /// Logits of `block` `[batch, L′]` after the committed tokens: `[batch, L′, vocab]`, or
    /// `[rows, vocab]` at `rows` (flat indices into the block's `[batch, L′]` positions). A
    /// single row's projection onto the vocabulary is a matrix-vector product, many times
    /// cheaper than the L′-row product when the model is small.
    fn block_logits(&mut self, block: &Tensor, rows: Option<&Tensor>) -> Result<Tensor>;
    /// Appends a finished block.
    fn commit(&mut self, block: &Tensor) -> Result<()>;
}

/// Per-layer post-RoPE keys/values of committed tokens, keeping the newest `capacity`
/// positions (older ones slide out of the window).
struct KvCache {
    layers: Vec<LayerKv>,
    capacity: usize,
}

impl KvCache {
    fn new(capacity: usize) -> Self {
        Self { layers: Vec::new(), capacity }
    }

    fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.k.size()[2] as usize)
    }

    /// Appends the keys/values of newly committed tokens, then drops the oldest beyond capacity.
    fn append(&mut self, new: Vec<LayerKv>) {
        self.layers = if self.layers.is_empty() {
            new
        } else {
            self.layers
                .iter()
                .zip(new)
                .map(|(old, new)| LayerKv {
                    k: Tensor::cat(&[&old.k, &new.k], 2),
                    v: Tensor::cat(&[&old.v, &new.v], 2),
                })
                .collect()
        };
        let len = self.len();
        if len > self.capacity {
            let (drop, keep) = ((len - self.capacity) as i64, self.capacity as i64);
            self.layers = self.layers.iter().map(|l| l.narrow(drop, keep)).collect();
        }
    }
}

/// The KV-cache context: a block attends to at most `window − L′` cached positions.
struct Cached<'a> {
    model: &'a Dit,
    projection: &'a VocabProjection,
    cache: KvCache,
    /// RoPE position of the next block (absolute: cached keys keep theirs when the window slides).
    position: usize,
}

impl BlockContext for Cached<'_> {
    fn block_logits(&mut self, block: &Tensor, rows: Option<&Tensor>) -> Result<Tensor> {
        let heads = rows.map_or(Heads::All, Heads::Rows);
        let projection = Some(self.projection);
        Ok(self.model.decode(block, &self.cache.layers, self.position, heads, false, projection)?.0.expect("logits"))
    }

    fn commit(&mut self, block: &Tensor) -> Result<()> {
        let (_, new) = self.model.decode(block, &self.cache.layers, self.position, Heads::None, true, None)?;
        self.position += block.size()[1] as usize;
        self.cache.append(new);
        Ok(())
    }
}

/// The reference: recompute the window (committed tail + block) with the block-causal mask.
struct Uncached<'a> {
    model: &'a Dit,
    projection: &'a VocabProjection,
    /// Committed tokens per row.
    committed: Vec<Tensor>,
    block_size: usize,
    max_context: usize,
}

impl BlockContext for Uncached<'_> {
    fn block_logits(&mut self, block: &Tensor, rows: Option<&Tensor>) -> Result<Tensor> {
        let context = match self.committed.is_empty() {
            true => block.shallow_clone(),
            false => {
                let all = Tensor::cat(&self.committed, 1);
                let n = all.size()[1];
                let keep = n.min(self.max_context as i64);
                Tensor::cat(&[all.narrow(1, n - keep, keep), block.shallow_clone()], 1)
            }
        };
        let (b, len) = context.size2()?;
        let bs = self.block_size as i64;
        let layout = BlockLayout::block_causal(len as usize, self.block_size)?;
        // Block row r, position i sits at r·len + (len − L′) + i of the context.
        let to_context = |flat: &Tensor| {
            let (r, i) = (flat.divide_scalar_mode(bs, "floor"), flat.remainder(bs));
            r * len + (len - bs) + i
        };
        match rows {
            Some(rows) => self.model.logits_at_projected(&context, &layout, &to_context(rows), self.projection),
            None => {
                let all = Tensor::arange(b * bs, (Kind::Int64, block.device()));
                let logits = self.model.logits_at_projected(&context, &layout, &to_context(&all), self.projection)?;
                Ok(logits.reshape([b, bs, -1]))
            }
        }
    }

    fn commit(&mut self, block: &Tensor) -> Result<()> {
        self.committed.push(block.shallow_clone());
        Ok(())
    }
}

/// Per-row state of a block being denoised.
struct BlockState {
    tokens: Vec<Vec<u32>>,
}

impl BlockState {
    fn masked(&self, row: usize, mask: u32) -> Vec<usize> {
        (0..self.tokens[row].len()).filter(|&i| self.tokens[row][i] == mask).collect()
    }

    fn any_masked(&self, mask: u32) -> bool {
        self.tokens.iter().flatten().any(|&t| t == mask)
    }

    fn tensor(&self, device: Device) -> Tensor {
        let flat: Vec<i64> = self.tokens.iter().flatten().map(|&t| t as i64).collect();
        Tensor::from_slice(&flat).reshape([self.tokens.len() as i64, -1]).to_device(device)
    }
}

/// Denoiser probabilities `[rows, vocab]` (fp64, on the CPU) from logits `[rows, vocab]`: the
/// temperature applied and `[MASK]` given probability 0. Only masked positions are ever sampled,
/// where this is SUBS's distribution (the carry-over rows of unmasked positions are not needed).
fn denoiser_probs(logits: &Tensor, mask: u32, temperature: f64) -> Tensor {
    let logits = logits.to_kind(Kind::Double) / temperature;
    let _ = logits.narrow(-1, mask as i64, 1).fill_(f64::NEG_INFINITY);
    logits.softmax(-1, Kind::Double).to_device(Device::Cpu)
}

fn generate_blocks(
    ctx: &mut dyn BlockContext,
    cfg: &Config,
    opts: &SampleOptions,
    device: Device,
    rng: &mut NoiseRng,
) -> Result<Generation> {
    let (bs, mask, batch) = (cfg.diffusion.block_size, cfg.diffusion.mask_id, opts.batch);
    let mut rows: Vec<Vec<u32>> = vec![Vec::new(); batch];
    let mut stops: Vec<Option<(StopReason, usize)>> = vec![None; batch];
    let (mut nfe, mut unmasked_per_call) = (0, Vec::new());
    while rows[0].len() < opts.len && stops.iter().any(Option::is_none) {
        let mut state = BlockState { tokens: vec![vec![mask; bs]; batch] };
        if rows[0].is_empty() {
            state.tokens.iter_mut().for_each(|b| b[0] = opts.ids.bos);
        }
        let mut probs: Option<Tensor> = None;
        let mut step = 0;
        while state.any_masked(mask) {
            // First-hitting picks its positions before the call; ancestral decides per position.
            let mut changed = 0;
            match opts.algorithm {
                Algorithm::FirstHitting => {
                    let picks: Vec<Option<usize>> = (0..batch)
                        .map(|r| {
                            let m = state.masked(r, mask);
                            (!m.is_empty()).then(|| m[rng.below(m.len())])
                        })
                        .collect();
                    let picked: Vec<(usize, usize)> =
                        picks.into_iter().enumerate().filter_map(|(r, i)| i.map(|i| (r, i))).collect();
                    let rows: Vec<i64> = picked.iter().map(|&(r, i)| (r * bs + i) as i64).collect();
                    let rows = Tensor::from_slice(&rows).to_device(device);
                    let probs =
                        denoiser_probs(&ctx.block_logits(&state.tensor(device), Some(&rows))?, mask, opts.temperature);
                    nfe += 1;
                    for (n, (r, i)) in picked.into_iter().enumerate() {
                        state.tokens[r][i] = sample_from(&probs.get(n as i64), opts, rng)?;
                        changed += 1;
                    }
                }
                Algorithm::Ancestral => {
                    let t = 1.0 - step as f64 / opts.steps as f64;
                    let s = (t - 1.0 / opts.steps as f64).max(0.0);
                    if probs.is_none() || !opts.reuse_outputs {
                        let logits = ctx.block_logits(&state.tensor(device), None)?;
                        probs = Some(denoiser_probs(&logits, mask, opts.temperature));
                        nfe += 1;
                        unmasked_per_call.push(0);
                    }
                    let p = probs.as_ref().expect("denoiser output");
                    for r in 0..batch {
                        for i in state.masked(r, mask) {
                            if rng.uniform() >= s / t {
                                state.tokens[r][i] = sample_from(&p.get(r as i64).get(i as i64), opts, rng)?;
                                changed += 1;
                            }
                        }
                    }
                    step += 1;
                }
            }
            match opts.algorithm {
                Algorithm::FirstHitting => unmasked_per_call.push(changed),
                Algorithm::Ancestral => *unmasked_per_call.last_mut().expect("a call was made") += changed,
            }
            if changed > 0 {
                probs = None;
            }
        }
        ctx.commit(&state.tensor(device))?;
        for (r, row) in rows.iter_mut().enumerate() {
            row.extend_from_slice(&state.tokens[r]);
            if stops[r].is_none() {
                stops[r] = stop_check(row, opts.ids.eos, opts.var_length);
            }
        }
    }
    Ok(finish(rows, stops, opts.len, nfe, unmasked_per_call))
}

/// The AR model: one token per call, with a causal KV cache (or the window recomputed).
fn generate_tokens(
    model: &Dit,
    projection: &VocabProjection,
    cfg: &Config,
    opts: &SampleOptions,
    device: Device,
    rng: &mut NoiseRng,
) -> Result<Generation> {
    let batch = opts.batch;
    let mut rows: Vec<Vec<u32>> = vec![vec![opts.ids.bos]; batch];
    let mut stops: Vec<Option<(StopReason, usize)>> = vec![None; batch];
    // The cache keeps the newest seq_len − 1 positions, so the fed token sees a window of seq_len.
    let mut cache = KvCache::new(cfg.model.seq_len - 1);
    let mut nfe = 0;
    while rows[0].len() < opts.len && stops.iter().any(Option::is_none) {
        let n = rows[0].len();
        let logits = if opts.kv_cache {
            let last: Vec<i64> = rows.iter().map(|r| r[n - 1] as i64).collect();
            let last = Tensor::from_slice(&last).reshape([batch as i64, 1]).to_device(device);
            let (logits, new) = model.decode(&last, &cache.layers, n - 1, Heads::All, true, Some(projection))?;
            cache.append(new);
            logits.expect("logits").select(1, 0)
        } else {
            let start = n.saturating_sub(cfg.model.seq_len);
            let flat: Vec<i64> = rows.iter().flat_map(|r| r[start..].iter().map(|&t| t as i64)).collect();
            let x = Tensor::from_slice(&flat).reshape([batch as i64, -1]).to_device(device);
            let len = n - start;
            let last: Vec<i64> = (0..batch).map(|r| (r * len + len - 1) as i64).collect();
            let last = Tensor::from_slice(&last).to_device(device);
            model.logits_at_projected(&x, &BlockLayout::Causal { seq_len: len }, &last, projection)?
        };
        nfe += 1;
        let probs = denoiser_probs(&logits, cfg.diffusion.mask_id, opts.temperature);
        for (r, row) in rows.iter_mut().enumerate() {
            row.push(sample_from(&probs.get(r as i64), opts, rng)?);
            if stops[r].is_none() {
                stops[r] = stop_check(row, opts.ids.eos, opts.var_length);
            }
        }
    }
    let calls = vec![batch; nfe];
    Ok(finish(rows, stops, opts.len, nfe, calls))
}

fn finish(
    rows: Vec<Vec<u32>>,
    stops: Vec<Option<(StopReason, usize)>>,
    len: usize,
    nfe: usize,
    unmasked_per_call: Vec<usize>,
) -> Generation {
    let samples = rows
        .into_iter()
        .zip(stops)
        .map(|(mut tokens, stop)| {
            let (stop, keep) = stop.unwrap_or((StopReason::Length, len));
            tokens.truncate(keep.min(len));
            Sample { tokens, stop }
        })
        .collect();
    Generation { samples, nfe, unmasked_per_call, seconds: 0.0 }
}

/// Variable-length stopping (docs/algorithm.md §5.7) on a row that starts with BOS: the first generated `eos` ends it
/// (kept), or a last-256-token unigram entropy under 4 nats (those 256 tokens are dropped).
/// Returns the reason and the length to keep.
pub fn stop_check(row: &[u32], eos: u32, var_length: bool) -> Option<(StopReason, usize)> {
    if !var_length {
        return None;
    }
    if let Some(i) = row.iter().skip(1).position(|&t| t == eos) {
        return Some((StopReason::Eos, i + 2));
    }
    if row.len() > ENTROPY_WINDOW && unigram_entropy(&row[row.len() - ENTROPY_WINDOW..]) < ENTROPY_MIN_NATS {
        return Some((StopReason::LowEntropy, row.len() - ENTROPY_WINDOW));
    }
    None
}

/// Entropy in nats of the token-id histogram (docs/algorithm.md §6.4).
pub fn unigram_entropy(tokens: &[u32]) -> f64 {
    let mut counts = std::collections::HashMap::new();
    for &t in tokens {
        *counts.entry(t).or_insert(0usize) += 1;
    }
    let n = tokens.len() as f64;
    counts.values().map(|&c| c as f64 / n).map(|p| -p * p.ln()).sum()
}

/// Draws a token from probabilities `[vocab]` (fp64, on the CPU) after the nucleus filter.
fn sample_from(probs: &Tensor, opts: &SampleOptions, rng: &mut NoiseRng) -> Result<u32> {
    let probs = Vec::<f64>::try_from(probs)?;
    let kept = nucleus_filter(&probs, opts.nucleus_p, opts.nucleus_rule);
    ensure!(!kept.is_empty(), "the distribution has no mass");
    let mut x = rng.uniform();
    for &(i, p) in &kept {
        x -= p;
        if x < 0.0 {
            return Ok(i as u32);
        }
    }
    Ok(kept.last().expect("non-empty").0 as u32)
}

/// The kept tokens of a nucleus filter with their renormalized probabilities, most likely first.
pub fn nucleus_filter(probs: &[f64], p: f64, rule: NucleusRule) -> Vec<(usize, f64)> {
    let total: f64 = probs.iter().filter(|&&x| x > 0.0).sum();
    // Sorting 50k probabilities per token dominates a small model's sampling. The nucleus is the
    // shortest run of most likely tokens reaching p, so it lies inside any set of most likely
    // tokens that reaches p: try those at or above the mean probability first.
    let tau = total / probs.len() as f64;
    let mut order: Vec<usize> = (0..probs.len()).filter(|&i| probs[i] >= tau && probs[i] > 0.0).collect();
    if order.iter().map(|&i| probs[i]).sum::<f64>() < p * total {
        order = (0..probs.len()).filter(|&i| probs[i] > 0.0).collect();
    }
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    let mut cumulative = 0.0;
    let mut cut = order.len();
    for (n, &i) in order.iter().enumerate() {
        cumulative += probs[i] / total;
        if cumulative >= p {
            cut = match rule {
                NucleusRule::Standard => n + 1,
                // The crossing token goes unless it equals p exactly; the top-1 always stays.
                NucleusRule::Reference => (if cumulative <= p { n + 1 } else { n }).max(1),
            };
            break;
        }
    }
    let kept: Vec<usize> = order.into_iter().take(cut).collect();
    let mass: f64 = kept.iter().map(|&i| probs[i]).sum();
    kept.into_iter().map(|i| (i, probs[i] / mass)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_probs(rng: &mut NoiseRng, n: usize) -> Vec<f64> {
        let raw: Vec<f64> = (0..n).map(|_| rng.uniform().powi(4)).collect();
        let total: f64 = raw.iter().sum();
        raw.into_iter().map(|x| x / total).collect()
    }

    #[test]
    fn nucleus_properties() {
        let mut rng = NoiseRng::new(4, 0, 0, 0);
        for trial in 0..200 {
            let probs = random_probs(&mut rng, 2 + trial % 50);
            let p = 0.05 + 0.9 * rng.uniform();
            let standard = nucleus_filter(&probs, p, NucleusRule::Standard);
            let reference = nucleus_filter(&probs, p, NucleusRule::Reference);
            let top1 = (0..probs.len()).max_by(|&a, &b| probs[a].total_cmp(&probs[b]).then(b.cmp(&a))).unwrap();
            for kept in [&standard, &reference] {
                assert_eq!(kept[0].0, top1, "top-1 always kept");
                let renormalized: f64 = kept.iter().map(|k| k.1).sum();
                // A sum of at most 51 fp64 probabilities: within 2·n·u ≈ 1e-14 of 1.
                assert!((renormalized - 1.0).abs() < 1e-12);
            }
            let mass: f64 = standard.iter().map(|&(i, _)| probs[i]).sum();
            // This sum and the filter's own of the same ≤ 51 probabilities: within 2·n·u ≈ 1e-14.
            assert!(mass >= p - 1e-12, "standard keeps at least p: {mass} < {p}");
            // Dropping its last (crossing) token takes the standard set below p.
            let without_last: f64 = standard[..standard.len() - 1].iter().map(|&(i, _)| probs[i]).sum();
            assert!(without_last < p);
            // The variants differ exactly in the crossing token (unless it is the top-1).
            let s: Vec<usize> = standard.iter().map(|k| k.0).collect();
            let r: Vec<usize> = reference.iter().map(|k| k.0).collect();
            if s.len() == 1 {
                assert_eq!(s, r);
            } else {
                assert_eq!(&s[..s.len() - 1], &r[..], "p = {p}");
            }
        }
    }

    #[test]
    fn nucleus_sampling_follows_the_renormalized_distribution() {
        let probs = [0.5, 0.3, 0.15, 0.05];
        let opts = SampleOptions {
            len: 2,
            batch: 1,
            algorithm: Algorithm::FirstHitting,
            steps: 1,
            kv_cache: true,
            reuse_outputs: true,
            var_length: false,
            nucleus_p: 0.7,
            nucleus_rule: NucleusRule::Standard,
            temperature: 1.0,
            seed: 0,
            ids: SpecialIds { bos: EOS_ID, eos: EOS_ID },
        };
        let t = Tensor::from_slice(&probs);
        let mut rng = NoiseRng::new(0, 0, 0, 0);
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            counts[sample_from(&t, &opts, &mut rng).unwrap() as usize] += 1;
        }
        assert_eq!((counts[2], counts[3]), (0, 0));
        let frac = counts[0] as f64 / 4000.0;
        assert!((frac - 0.625).abs() < 0.03, "{frac}");
    }

    #[test]
    fn stopping_rules_truncate_as_specified() {
        // Distinct ids (GPT-2 uses one for both), outside the ranges of the rows below.
        const BOS: u32 = 1000;
        const EOS: u32 = 1001;
        assert_eq!(stop_check(&[BOS, 5, 6, EOS, 7], EOS, false), None);
        assert_eq!(stop_check(&[BOS, 5, 6, EOS, 7, EOS], EOS, true), Some((StopReason::Eos, 4)));
        assert_eq!(stop_check(&[BOS, 5, 6], EOS, true), None);
        // 300 tokens cycling over 40 ids: entropy ln 40 ≈ 3.7 < 4 → drop the last 256.
        let low: Vec<u32> = std::iter::once(BOS).chain((0..299).map(|i| (i % 40) as u32)).collect();
        assert_eq!(stop_check(&low, EOS, true), Some((StopReason::LowEntropy, 300 - 256)));
        // Cycling over 100 ids: ln 100 ≈ 4.6 ≥ 4 → go on.
        let high: Vec<u32> = std::iter::once(BOS).chain((0..299).map(|i| (i % 100) as u32)).collect();
        assert_eq!(stop_check(&high, EOS, true), None);
        // Four fp64 terms p·ln p: a few ulps off ln 4.
        assert!((unigram_entropy(&[1, 2, 3, 4]) - 4f64.ln()).abs() < 1e-12);
    }
}
