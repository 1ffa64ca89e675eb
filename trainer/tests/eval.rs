//! `eval::nelbo` against the bound recomputed independently, and the clip search end to end.

mod common;

use tch::{nn, Device};
use trainer::config::{Config, ModelConfig};
use trainer::diffusion::{tokens_tensor, BlockDiffusion, ClipInterval};
use trainer::dist::SingleProcess;
use trainer::eval::{clip_candidates, clip_search, nelbo, EvalBatches};
use trainer::model::Dit;
use trainer::objective::Objective;
use trainer::rng::{stream, NoiseRng};

const SEQ: usize = 16;

fn setup(block_size: usize) -> (nn::VarStore, Dit, Config) {
    let mut cfg = Config::from_toml_str("", &[]).unwrap();
    cfg.model = common::tiny_model_config(ModelConfig { vocab_size: 50, ..cfg.model }, 2, SEQ);
    cfg.diffusion.mask_id = 49;
    cfg.diffusion.block_size = block_size;
    let (vs, model) = common::random_model(&cfg.model, 3, 0.3);
    (vs, model, cfg)
}

fn sequences(n: usize) -> Vec<u32> {
    let mut rng = NoiseRng::new(8, 0, 0, 0);
    (0..n * SEQ).map(|_| rng.below(49) as u32).collect()
}

#[test]
fn nelbo_is_the_token_weighted_bound_recomputed_independently() {
    let (_vs, model, cfg) = setup(4);
    let data = sequences(7);
    let batches = EvalBatches { seq_len: SEQ, micro_batch: 3, max_batches: 0 };
    let report = nelbo(&model, &Objective::new(&cfg).unwrap(), &data, batches, 5, &SingleProcess).unwrap();

    // The same protocol by hand: batches of 3, 3 and 1 sequences, noise from (seed, batch), the
    // naive two-pass denoiser, every position but the first of each sequence counted.
    let obj = BlockDiffusion::new(&cfg.model, &cfg.diffusion).unwrap();
    let (mut total, mut count) = (0.0, 0);
    for (i, rows) in [(0usize, 3usize), (1, 3), (2, 1)] {
        let tokens = &data[i * 3 * SEQ..(i * 3 + rows) * SEQ];
        let mut rng = NoiseRng::new(5, stream::VALID_NOISE, i as u64, 0);
        let noise = obj.sample_noise(tokens, rows, ClipInterval::FULL, &mut rng).unwrap();
        let x0 = tokens_tensor(tokens, rows, SEQ, Device::Cpu);
        let terms = tch::no_grad(|| obj.token_losses_naive(&model, &x0, &noise, false).unwrap());
        for r in 0..rows as i64 {
            for c in 1..SEQ as i64 {
                total += terms.double_value(&[r, c]);
                count += 1;
            }
        }
    }
    assert_eq!(report.tokens, count);
    let expected_ppl = (total / count as f64).exp();
    // The NLL per token (the log of the PPL) is within REFERENCE_TOLERANCE of the hand-made one.
    let tol = common::REFERENCE_TOLERANCE;
    assert!((report.ppl().ln() - expected_ppl.ln()).abs() <= tol, "{} vs {expected_ppl}", report.ppl());
    // One division by ln 2 both ways; libm's ln 2 may be one rounding off the constant's.
    let bits = report.nll / 2f64.ln();
    assert!((report.bits_per_token() - bits).abs() <= 2.0 * f64::EPSILON * bits.abs());
}

#[test]
fn clip_search_scores_every_feasible_candidate() {
    let (_vs, model, cfg) = setup(4);
    let obj = BlockDiffusion::new(&cfg.model, &cfg.diffusion).unwrap();
    let data = sequences(8);
    let candidates = clip_candidates(4, &cfg.diffusion.clip_search_widths, cfg.diffusion.clip_search_delta);
    let batches = EvalBatches { seq_len: SEQ, micro_batch: 4, max_batches: 2 };
    let search = clip_search(&model, &obj, &data, batches, candidates.clone(), 1, &SingleProcess).unwrap();
    assert!(search.batches.iter().all(|&b| b == 2), "every candidate admits some k/4: {:?}", search.batches);
    let (best, variance) = search.best().unwrap();
    let min = search.variance_sums.iter().cloned().fold(f64::INFINITY, f64::min);
    let i = candidates.iter().position(|c| *c == best).unwrap();
    assert_eq!(search.variance_sums[i], min);
    assert!(variance.is_finite() && variance > 0.0);
    // Clipping away small t (which the loss weights by 1/t) lowers the variance here.
    assert_ne!(best, ClipInterval::FULL);
}

/// Per-target brute force: target p is scored with context [begin, p), where begin is 0 for
/// p < W and k·W/2 with k = (p − W)/(W/2) + 1 after that.
fn brute_force_nll(judge: &Dit, tokens: &[u32], w: usize) -> (f64, usize) {
    let s = w / 2;
    let (mut total, mut n) = (0.0, 0);
    for p in 1..tokens.len() {
        if tokens[p] == 50256 {
            continue;
        }
        let begin = if p < w { 0 } else { ((p - w) / s + 1) * s };
        let ctx = tokens_tensor(&tokens[begin..p], 1, p - begin, Device::Cpu);
        let logits =
            judge.logits(&ctx, &kernels::BlockLayout::Causal { seq_len: p - begin }, p - begin, false).unwrap();
        let last = logits.select(1, (p - begin - 1) as i64).to_kind(tch::Kind::Double);
        let _ = last.narrow(1, 50257, 1).fill_(f64::NEG_INFINITY);
        total -= last.log_softmax(-1, tch::Kind::Double).double_value(&[0, tokens[p] as i64]);
        n += 1;
    }
    (total, n)
}

#[test]
fn generative_perplexity_scores_every_token_once_with_strided_windows() {
    let mut cfg = Config::from_toml_str("", &[]).unwrap();
    let ar = ModelConfig { arch: trainer::config::Arch::Ar, ..cfg.model };
    cfg.model = ModelConfig { cond_dim: ar.cond_dim, ..common::tiny_model_config(ar, 2, 8) };
    let (_vs, judge) = common::random_model(&cfg.model, 4, 0.3);
    let mut rng = NoiseRng::new(2, 0, 0, 0);
    let mut sample = |n: usize| -> Vec<u32> {
        let mut s: Vec<u32> = (0..n).map(|_| rng.below(1000) as u32).collect();
        s[0] = 50256;
        s
    };
    let (short, mut long) = (sample(5), sample(23));
    long[13] = 50256; // an EOS target is not scored
    let samples = vec![short.clone(), long.clone()];
    let report = trainer::eval::generation_report(&judge, &samples, 8, 50256, 50257).unwrap();
    for (i, s) in samples.iter().enumerate() {
        let (nll, n) = tch::no_grad(|| brute_force_nll(&judge, s, 8));
        let (ours, count) = tch::no_grad(|| trainer::eval::judge_nll(&judge, s, 8, 50256, 50257).unwrap());
        assert_eq!(count, n);
        // Per target within REFERENCE_TOLERANCE, so the sum of n within n times it, and the PPL's
        // log (the mean) within it.
        let tol = common::REFERENCE_TOLERANCE;
        assert!((ours - nll).abs() <= n as f64 * tol, "sample {i}: {ours} vs {nll}");
        assert!((report.sample_ppl[i].ln() - nll / n as f64).abs() <= tol, "sample {i}: {report:?}");
    }
    assert_eq!(trainer::eval::judge_nll(&judge, &long, 8, 50256, 50257).unwrap().1, 21, "22 targets, one EOS");
    assert_eq!(report.mean_ppl, (report.sample_ppl[0] + report.sample_ppl[1]) / 2.0);
    assert_eq!((report.median_length, report.max_length), ((4.0 + 21.0) / 2.0, 21));
    assert!(report.entropy.iter().all(|&h| h > 0.0));
}
