//! Evaluation: the NELBO perplexity bound (docs/algorithm.md §6.1) and the data-driven clip search (§4.2).

use anyhow::Result;
use tch::{Kind, Tensor};

use crate::diffusion::{BlockDiffusion, ClipInterval};
use crate::dist::{Communicator, ReduceOp};
use crate::model::Dit;
use crate::objective::Objective;
use crate::rng::{stream, NoiseRng};

/// Token-weighted negative log-likelihood bound over a split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NelboReport {
    /// Nats per token.
    pub nll: f64,
    /// Tokens counted (the first token of each sequence is not).
    pub tokens: usize,
}

impl NelboReport {
    pub fn ppl(&self) -> f64 {
        self.nll.exp()
    }

    pub fn bits_per_token(&self) -> f64 {
        self.nll / std::f64::consts::LN_2
    }
}

/// How a split is cut into evaluation batches: `micro_batch` sequences each (the last may be
/// shorter), at most `max_batches` of them (0 = all).
#[derive(Debug, Clone, Copy)]
pub struct EvalBatches {
    pub seq_len: usize,
    pub micro_batch: usize,
    pub max_batches: usize,
}

impl EvalBatches {
    /// `(batch index, rows, tokens)` of every batch of `sequences`.
    pub fn iter<'a>(&self, sequences: &'a [u32]) -> impl Iterator<Item = (usize, usize, &'a [u32])> + 'a {
        let (l, mb) = (self.seq_len, self.micro_batch);
        let n = sequences.len() / l;
        let mut batches = n.div_ceil(mb);
        if self.max_batches > 0 {
            batches = batches.min(self.max_batches);
        }
        (0..batches).map(move |i| {
            let rows = mb.min(n - i * mb);
            (i, rows, &sequences[i * mb * l..(i * mb + rows) * l])
        })
    }
}

/// NELBO (docs/algorithm.md §6.1): one Monte-Carlo draw per sequence with t ∈ [1e-3, 1] per block (antithetic),
/// the first token neither masked nor counted, token-weighted over the split. The AR model's
/// exact NLL of tokens 1..L. The noise of batch i is drawn from (seed, i), so the number is
/// reproducible and comparable between evaluations.
///
/// The batches are shared out over `comm`'s ranks (batch i on rank i mod W) and the sums of
/// every rank added in fp64: every rank returns the number one process would (up to the order
/// of fp64 additions), in about 1/W of the time.
pub fn nelbo(
    model: &Dit,
    objective: &Objective,
    sequences: &[u32],
    batches: EvalBatches,
    seed: u64,
    comm: &dyn Communicator,
) -> Result<NelboReport> {
    nelbo_on_interval(model, objective, sequences, batches, ClipInterval::FULL, seed, comm)
}

/// [`nelbo`] with t drawn from `clip` instead of the full interval. Only the full interval
/// gives the bound that is reported; the one other unbiased choice is (1, 1) at L′ = 1, where
/// every token is masked with weight 1 and the "estimate" is the exact NLL
/// (docs/algorithm.md §3.8, §6.1). Any other clipped interval is a biased estimate
/// (docs/algorithm.md §3.4).
pub fn nelbo_on_interval(
    model: &Dit,
    objective: &Objective,
    sequences: &[u32],
    batches: EvalBatches,
    clip: ClipInterval,
    seed: u64,
    comm: &dyn Communicator,
) -> Result<NelboReport> {
    let (mut total, mut tokens) = (0.0, 0usize);
    tch::no_grad(|| -> Result<()> {
        for (i, rows, batch) in batches.iter(sequences).filter(|(i, ..)| i % comm.world_size() == comm.rank()) {
            let mut rng = NoiseRng::new(seed, stream::VALID_NOISE, i as u64, 0);
            let terms = objective.token_losses(model, batch, rows, clip, &mut rng, false)?;
            let cols = terms.size()[1];
            // Diffusion: drop position 0 (clean, not counted). AR: already predicts 1..L.
            let counted = if cols as usize == batches.seq_len { terms.narrow(1, 1, cols - 1) } else { terms };
            total += counted.to_kind(Kind::Double).sum(Kind::Double).double_value(&[]);
            // Padding positions have zero terms and are not counted either.
            tokens += objective.counted_terms(batch, rows, true);
        }
        Ok(())
    })?;
    let mut sums = [total, tokens as f64];
    sum_over_ranks(comm, &mut sums)?;
    let [total, tokens] = sums;
    Ok(NelboReport { nll: total / tokens.max(1.0), tokens: tokens as usize })
}

/// Replaces `values` by every rank's `values` added up (fp64; exact for counts below 2^53).
fn sum_over_ranks(comm: &dyn Communicator, values: &mut [f64]) -> Result<()> {
    if comm.world_size() > 1 {
        let t = Tensor::from_slice(values);
        comm.all_reduce(&t, ReduceOp::Sum)?;
        t.copy_data(values, values.len());
    }
    Ok(())
}

/// The clip intervals searched (docs/algorithm.md §4.2): (1e-3, 1) plus, for every width w and start
/// s = 0, δ, 2δ, … with s + w ≤ 1, the interval (max(s, 1e-3), s + w). For L′ = 1 only linear
/// (1e-3, 1) against full masking (1, 1).
pub fn clip_candidates(block_size: usize, widths: &[f64], delta: f64) -> Vec<ClipInterval> {
    if block_size == 1 {
        return vec![ClipInterval::FULL, ClipInterval { beta: 1.0, omega: 1.0 }];
    }
    let mut out = vec![ClipInterval::FULL];
    for &w in widths {
        let starts = ((1.0 - w) / delta + 1e-9).floor() as usize;
        for k in 0..=starts {
            // Rounded to 1e-9 so that 0.05 × 3 + 0.5 is 0.65, not 0.65000000000000002.
            let round = |x: f64| (x * 1e9).round() / 1e9;
            let s = round(k as f64 * delta);
            out.push(ClipInterval { beta: s.max(ClipInterval::FULL.beta), omega: round(s + w) });
        }
    }
    out
}

/// Accumulates, per candidate interval, the unbiased variance of per-block mean losses of each
/// batch, summed over batches; the interval with the smallest sum wins.
#[derive(Debug, Clone)]
pub struct ClipSearch {
    pub candidates: Vec<ClipInterval>,
    pub variance_sums: Vec<f64>,
    pub batches: Vec<usize>,
}

impl ClipSearch {
    pub fn new(candidates: Vec<ClipInterval>) -> Self {
        let n = candidates.len();
        Self { candidates, variance_sums: vec![0.0; n], batches: vec![0; n] }
    }

    /// `per_block` `[batch, blocks]`: the mean loss of every block of a batch under candidate
    /// `index`.
    pub fn observe(&mut self, index: usize, per_block: &Tensor) {
        let var = per_block.to_kind(Kind::Double).reshape([-1]).var(true).double_value(&[]);
        self.variance_sums[index] += var;
        self.batches[index] += 1;
    }

    /// The candidate with the smallest summed variance and its mean variance per batch; among
    /// equal sums the earlier candidate (the unclipped one first).
    pub fn best(&self) -> Option<(ClipInterval, f64)> {
        (0..self.candidates.len())
            .filter(|&i| self.batches[i] > 0)
            .min_by(|&a, &b| self.variance_sums[a].total_cmp(&self.variance_sums[b]).then(a.cmp(&b)))
            .map(|i| (self.candidates[i], self.variance_sums[i] / self.batches[i] as f64))
    }
}

/// Runs the clip search over the first batches of a split. Every candidate sees the same clean
/// batches and the same random numbers (common random numbers make the comparison sharper);
/// candidates whose resampling rule no block size can meet are skipped. Shared out over
/// `comm`'s ranks like [`nelbo`]: every rank ends with the sums, and so the winner, of one
/// process.
pub fn clip_search(
    model: &Dit,
    objective: &BlockDiffusion,
    sequences: &[u32],
    batches: EvalBatches,
    candidates: Vec<ClipInterval>,
    seed: u64,
    comm: &dyn Communicator,
) -> Result<ClipSearch> {
    let mut search = ClipSearch::new(candidates);
    let device = model.device();
    let nb = (objective.seq_len / objective.block_size) as i64;
    tch::no_grad(|| -> Result<()> {
        for (i, rows, batch) in batches.iter(sequences).filter(|(i, ..)| i % comm.world_size() == comm.rank()) {
            let x0 = crate::diffusion::tokens_tensor(batch, rows, objective.seq_len, device);
            for c in 0..search.candidates.len() {
                let mut rng = NoiseRng::new(seed, stream::CLIP_SEARCH, i as u64, 0);
                let Ok(noise) = objective.sample_noise(batch, rows, search.candidates[c], &mut rng) else {
                    continue;
                };
                let terms = objective.token_losses(model, &x0, &noise, false)?;
                search.observe(c, &terms.reshape([rows as i64, nb, -1]).mean_dim(-1, false, terms.kind()));
            }
        }
        Ok(())
    })?;
    sum_over_ranks(comm, &mut search.variance_sums)?;
    let mut counts: Vec<f64> = search.batches.iter().map(|&b| b as f64).collect();
    sum_over_ranks(comm, &mut counts)?;
    search.batches = counts.into_iter().map(|b| b as usize).collect();
    Ok(search)
}

/// Generation quality of a set of samples (docs/algorithm.md §6.3–6.5).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GenReport {
    /// exp(mean NLL) of each sample under the judge.
    pub sample_ppl: Vec<f64>,
    /// The reported number: the mean of the per-sample perplexities.
    pub mean_ppl: f64,
    /// exp of the token-weighted mean NLL over all samples.
    pub corpus_ppl: f64,
    /// Unigram entropy (nats) of each sample's token ids, and their mean.
    pub entropy: Vec<f64>,
    pub mean_entropy: f64,
    /// Non-EOS tokens per sample: median and maximum.
    pub median_length: f64,
    pub max_length: usize,
}

/// Per-target NLL of `tokens` under a causal judge with context `window`: windows of `window`
/// tokens moving by `window / 2`; the first scores all its targets, each later one only its
/// last `window / 2` (so every token is scored once, with at least half a window of context).
/// Targets equal to `eos` are not scored. Returns (sum of NLL, targets scored).
pub fn judge_nll(judge: &Dit, tokens: &[u32], window: usize, eos: u32, mask_id: u32) -> Result<(f64, usize)> {
    let stride = (window / 2).max(1);
    let (mut total, mut count) = (0.0, 0usize);
    let (mut begin, mut scored_to) = (0usize, 1usize);
    while scored_to < tokens.len() {
        let end = (begin + window).min(tokens.len());
        let x = crate::diffusion::tokens_tensor(&tokens[begin..end], 1, end - begin, judge.device());
        let logits = judge.logits(&x, &kernels::BlockLayout::Causal { seq_len: end - begin }, end - begin, false)?;
        let log_probs = crate::diffusion::mask_logit_removed(&logits, mask_id).log_softmax(-1, Kind::Double);
        for (target, &token) in tokens.iter().enumerate().take(end).skip(scored_to) {
            if token != eos {
                total -= log_probs.double_value(&[0, (target - 1 - begin) as i64, token as i64]);
                count += 1;
            }
        }
        scored_to = end;
        begin += stride;
    }
    Ok((total, count))
}

/// Scores samples with an AR judge (docs/algorithm.md §6.3), and reports entropy (§6.4) and lengths (§6.5).
pub fn generation_report(
    judge: &Dit,
    samples: &[Vec<u32>],
    window: usize,
    eos: u32,
    mask_id: u32,
) -> Result<GenReport> {
    let (mut sample_ppl, mut total, mut count) = (Vec::new(), 0.0, 0usize);
    tch::no_grad(|| -> Result<()> {
        for s in samples {
            let (nll, n) = judge_nll(judge, s, window, eos, mask_id)?;
            sample_ppl.push((nll / n.max(1) as f64).exp());
            (total, count) = (total + nll, count + n);
        }
        Ok(())
    })?;
    let entropy: Vec<f64> = samples.iter().map(|s| crate::sample::unigram_entropy(s)).collect();
    let mut lengths: Vec<usize> = samples.iter().map(|s| s.iter().filter(|&&t| t != eos).count()).collect();
    lengths.sort_unstable();
    let median_length = match lengths.len() {
        0 => 0.0,
        n if n % 2 == 1 => lengths[n / 2] as f64,
        n => (lengths[n / 2 - 1] + lengths[n / 2]) as f64 / 2.0,
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    Ok(GenReport {
        mean_ppl: mean(&sample_ppl),
        corpus_ppl: (total / count.max(1) as f64).exp(),
        mean_entropy: mean(&entropy),
        sample_ppl,
        entropy,
        median_length,
        max_length: lengths.last().copied().unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn candidates_are_the_reference_grid() {
        let c = clip_candidates(16, &[0.5, 0.6, 0.7, 0.8, 0.9], 0.05);
        assert_eq!(c.len(), 36);
        assert_eq!(c[0], ClipInterval::FULL);
        assert_eq!(c[1], ClipInterval { beta: 1e-3, omega: 0.5 });
        assert_eq!(c[2], ClipInterval { beta: 0.05, omega: 0.55 });
        assert_eq!(c[11], ClipInterval { beta: 0.5, omega: 1.0 });
        assert_eq!(c[35], ClipInterval { beta: 0.1, omega: 1.0 });
        assert_eq!(clip_candidates(1, &[0.5], 0.05).len(), 2);
    }

    #[test]
    fn search_picks_the_minimum_variance_interval() {
        let candidates = clip_candidates(4, &[0.5], 0.25);
        assert_eq!(candidates.len(), 4);
        let mut search = ClipSearch::new(candidates.clone());
        // Per-block losses with variances 4, 1, 9 and 0.25 (two batches each, the same spread).
        let spread = |sd: f64| Tensor::from_slice(&[-sd, sd, -sd, sd]).reshape([2, 2]) + 3.0;
        for _ in 0..2 {
            for (i, sd) in [2.0, 1.0, 3.0, 0.5].into_iter().enumerate() {
                search.observe(i, &spread(sd).to_device(Device::Cpu));
            }
        }
        let (best, var) = search.best().unwrap();
        assert_eq!(best, candidates[3]);
        // Unbiased variance of [−½, ½, −½, ½] is 1/3.
        // The variance of a few fp64 values of order 1: a few ulps off 1/3.
        assert!((var - 1.0 / 3.0).abs() < 1e-12, "{var}");
        assert_eq!(ClipSearch::new(candidates).best(), None);
    }
}
