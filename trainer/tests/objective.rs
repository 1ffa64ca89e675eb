//! The vectorized block-diffusion objective against the references it must equal (docs/algorithm.md §2–§3):
//! the naive two-pass Algorithm 1, MDLM for L′ = L, next-token NLL for L′ = 1 with t ≡ 1.

mod common;

use kernels::BlockLayout;
use tch::{nn, Device, Kind, Tensor};
use trainer::config::{Arch, DiffusionConfig, ModelConfig};
use trainer::diffusion::{tokens_tensor, BlockDiffusion, ClipInterval};
use trainer::model::{num_parameters, Dit};
use trainer::rng::NoiseRng;

const VOCAB: usize = 50;
const MASK: u32 = 49;
const SEQ: usize = 16;
const BATCH: usize = 2;

fn tiny_config() -> ModelConfig {
    let base = ModelConfig {
        arch: Arch::Bd3,
        mlp_ratio: 4,
        vocab_size: VOCAB,
        time_conditioning: false,
        ..ModelConfig::small()
    };
    common::tiny_model_config(base, 4, SEQ)
}

fn random_model(seed: i64) -> (nn::VarStore, Dit) {
    common::random_model(&tiny_config(), seed, 0.3)
}

fn objective(block_size: usize) -> BlockDiffusion {
    let diffusion = DiffusionConfig { block_size, mask_id: MASK, ..DiffusionConfig::default() };
    BlockDiffusion::new(&tiny_config(), &diffusion).unwrap()
}

fn clean_batch(seed: u64) -> Vec<u32> {
    let mut rng = NoiseRng::new(seed, 9, 0, 0);
    (0..BATCH * SEQ).map(|_| rng.below(VOCAB - 1) as u32).collect()
}

/// Loss and the gradient of every parameter (in name order) of `loss_fn`.
fn loss_and_grads(vs: &nn::VarStore, loss_fn: impl FnOnce() -> Tensor) -> (f64, Vec<(String, Tensor)>) {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, t) in vars.iter_mut() {
        t.zero_grad();
    }
    let loss = loss_fn();
    loss.backward();
    let grads = vars.iter().map(|(n, t)| (n.clone(), t.grad().copy())).collect();
    (loss.double_value(&[]), grads)
}

fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) {
    let diff = (a - b).abs().max().double_value(&[]);
    assert!(diff <= tol, "{what}: max difference {diff:e} > {tol:e}");
    eprintln!("{what}: max difference {diff:e} (tolerance {tol:e})");
}

#[test]
fn vectorized_pass_equals_naive_two_pass_algorithm() {
    let (vs, model) = random_model(0);
    for block_size in [1, 2, 4, 8] {
        let obj = objective(block_size);
        let tokens = clean_batch(block_size as u64);
        let x0 = tokens_tensor(&tokens, BATCH, SEQ, Device::Cpu);
        let noise = obj.sample_noise(&tokens, BATCH, ClipInterval::FULL, &mut NoiseRng::new(5, 0, 0, 0)).unwrap();
        assert!(noise.xt.iter().filter(|&&t| t == MASK).count() > 0);
        let (vec_loss, vec_grads) =
            loss_and_grads(&vs, || obj.token_losses_two_stream(&model, &x0, &noise, true).unwrap().mean(Kind::Double));
        let dense = obj.token_losses_two_stream_dense(&model, &x0, &noise, true).unwrap();
        let masked = obj.token_losses_two_stream(&model, &x0, &noise, true).unwrap();
        // Per-token terms carry the 1/t weight (up to 1000×): compare them relatively.
        let scale = dense.abs().max().double_value(&[]).max(1.0);
        assert_close(
            &format!("L'={block_size}: dense vs masked-position logits"),
            &dense,
            &masked,
            common::REFERENCE_TOLERANCE * scale,
        );
        let (naive_loss, naive_grads) =
            loss_and_grads(&vs, || obj.token_losses_naive(&model, &x0, &noise, true).unwrap().mean(Kind::Double));
        assert!(vec_loss > 0.0);
        assert!(
            (vec_loss - naive_loss).abs() <= common::REFERENCE_TOLERANCE,
            "L'={block_size}: {vec_loss} vs {naive_loss}"
        );
        let mut nonzero = 0;
        for ((name, g1), (_, g2)) in vec_grads.iter().zip(&naive_grads) {
            assert_close(&format!("L'={block_size} grad {name}"), g1, g2, common::REFERENCE_TOLERANCE);
            nonzero += usize::from(g1.abs().max().double_value(&[]) > 0.0);
        }
        assert!(nonzero >= vec_grads.len() - 1, "L'={block_size}: most gradients are non-zero");
    }
}

#[test]
fn full_block_equals_mdlm_single_pass() {
    let (vs, model) = random_model(1);
    let obj = objective(SEQ);
    let tokens = clean_batch(11);
    let x0 = tokens_tensor(&tokens, BATCH, SEQ, Device::Cpu);
    let noise = obj.sample_noise(&tokens, BATCH, ClipInterval::FULL, &mut NoiseRng::new(6, 0, 0, 0)).unwrap();
    let (two, two_grads) =
        loss_and_grads(&vs, || obj.token_losses_two_stream(&model, &x0, &noise, true).unwrap().mean(Kind::Double));
    let (one, one_grads) =
        loss_and_grads(&vs, || obj.token_losses_single_stream(&model, &x0, &noise, true).unwrap().mean(Kind::Double));
    assert!((two - one).abs() <= common::REFERENCE_TOLERANCE, "{two} vs {one}");
    for ((name, g1), (_, g2)) in two_grads.iter().zip(&one_grads) {
        assert_close(name, g1, g2, common::REFERENCE_TOLERANCE);
    }
    // The default entry point takes the single pass for L' = L: the same computation.
    let default = obj.loss(&model, &x0, &noise, true).unwrap().double_value(&[]);
    assert_eq!(default, one);
}

#[test]
fn block_size_one_with_full_masking_is_next_token_nll() {
    let (_vs, model) = random_model(2);
    let obj = objective(1);
    let tokens = clean_batch(12);
    let x0 = tokens_tensor(&tokens, BATCH, SEQ, Device::Cpu);
    let all_masked = ClipInterval { beta: 1.0, omega: 1.0 };
    let noise = obj.sample_noise(&tokens, BATCH, all_masked, &mut NoiseRng::new(7, 0, 0, 0)).unwrap();
    let loss = obj.token_losses_two_stream(&model, &x0, &noise, false).unwrap().mean(Kind::Double).double_value(&[]);

    // The same network reading x_<i followed by [MASK] at position i, causally, one prefix at a time.
    let mut nll = 0.0;
    for i in 1..SEQ as i64 {
        let query = Tensor::full([BATCH as i64, 1], MASK as i64, (Kind::Int64, Device::Cpu));
        let input = Tensor::cat(&[x0.narrow(1, 0, i), query], 1);
        let logits =
            model.logits(&input, &BlockLayout::Causal { seq_len: i as usize + 1 }, i as usize + 1, false).unwrap();
        let last = logits.select(1, i).to_kind(Kind::Double);
        let _ = last.narrow(1, MASK as i64, 1).fill_(f64::NEG_INFINITY);
        let log_probs = last.log_softmax(-1, Kind::Double);
        nll -= log_probs.gather(1, &x0.narrow(1, i, 1), false).sum(Kind::Double).double_value(&[]);
    }
    // Position 0 stays clean and contributes 0; the mean runs over all B·L tokens.
    let expected = nll / (BATCH * SEQ) as f64;
    assert!((loss - expected).abs() <= common::REFERENCE_TOLERANCE, "{loss} vs {expected}");
}

/// Expected keys and shapes of the reference's `small` state dict (docs/algorithm.md §1.7).
fn reference_small_keys() -> Vec<(String, Vec<i64>)> {
    let mut keys: Vec<(String, Vec<i64>)> = vec![
        ("backbone.vocab_embed.embedding".into(), vec![50258, 768]),
        ("backbone.sigma_map.mlp.0.weight".into(), vec![128, 256]),
        ("backbone.sigma_map.mlp.0.bias".into(), vec![128]),
        ("backbone.sigma_map.mlp.2.weight".into(), vec![128, 128]),
        ("backbone.sigma_map.mlp.2.bias".into(), vec![128]),
        ("backbone.rotary_emb.inv_freq".into(), vec![32]),
        ("backbone.output_layer.norm_final.weight".into(), vec![768]),
        ("backbone.output_layer.linear.weight".into(), vec![50258, 768]),
        ("backbone.output_layer.linear.bias".into(), vec![50258]),
        ("backbone.output_layer.adaLN_modulation.weight".into(), vec![1536, 128]),
        ("backbone.output_layer.adaLN_modulation.bias".into(), vec![1536]),
        ("sampling_eps_min".into(), vec![]),
        ("sampling_eps_max".into(), vec![]),
    ];
    for i in 0..12 {
        let b = format!("backbone.blocks.{i}");
        keys.extend([
            (format!("{b}.norm1.weight"), vec![768]),
            (format!("{b}.norm2.weight"), vec![768]),
            (format!("{b}.attn_qkv.weight"), vec![2304, 768]),
            (format!("{b}.attn_out.weight"), vec![768, 768]),
            (format!("{b}.mlp.0.weight"), vec![3072, 768]),
            (format!("{b}.mlp.0.bias"), vec![3072]),
            (format!("{b}.mlp.2.weight"), vec![768, 3072]),
            (format!("{b}.mlp.2.bias"), vec![768]),
            (format!("{b}.adaLN_modulation.weight"), vec![4608, 128]),
            (format!("{b}.adaLN_modulation.bias"), vec![4608]),
        ]);
    }
    keys.sort();
    keys
}

#[test]
fn small_model_has_the_reference_keys_shapes_and_size() {
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = Dit::new(&vs.root(), &ModelConfig::small()).unwrap();
    let mut ours: Vec<(String, Vec<i64>)> = vs.variables().into_iter().map(|(n, t)| (n, t.size())).collect();
    ours.sort();
    assert_eq!(ours, reference_small_keys());
    assert_eq!(num_parameters(&vs), 169_627_218);

    // The AR variant: no σ-map, no adaLN (docs/algorithm.md §1.8).
    let vs = nn::VarStore::new(Device::Cpu);
    let _ar = Dit::new(&vs.root(), &ModelConfig { arch: Arch::Ar, ..ModelConfig::small() }).unwrap();
    assert_eq!(num_parameters(&vs), 162_246_482);
    assert!(vs.variables().keys().all(|k| !k.contains("adaLN") && !k.contains("sigma_map")));
}

/// A data set prepared with `--framing pad`: terms at padding positions are 0 (AR and diffusion),
/// the others are those of the objective without padding (same noise), and the counts leave the
/// padding out (and position 0 where evaluation does).
#[test]
fn padding_positions_have_no_loss_and_are_not_counted() {
    const PAD: u32 = 0;
    let (_vs, model) = random_model(5);
    // No padding id among the clean tokens but where it is put.
    let mut tokens: Vec<u32> = clean_batch(2).into_iter().map(|t| t.max(1)).collect();
    // Row 0 ends in 5 padding positions, row 1 in 1.
    tokens[SEQ - 5..SEQ].fill(PAD);
    tokens[2 * SEQ - 1] = PAD;
    for arch in [Arch::Bd3, Arch::Ar] {
        let mut cfg = trainer::Config::from_toml_str("", &[]).unwrap();
        cfg.model = ModelConfig { arch, ..tiny_config() };
        cfg.diffusion = DiffusionConfig { block_size: 4, mask_id: MASK, ..DiffusionConfig::default() };
        let plain = trainer::objective::Objective::new(&cfg).unwrap();
        let padded =
            trainer::objective::Objective { pad_id: Some(PAD), ..trainer::objective::Objective::new(&cfg).unwrap() };
        let terms = |objective: &trainer::objective::Objective| {
            let mut rng = NoiseRng::new(4, 0, 0, 0);
            tch::no_grad(|| {
                objective.token_losses(&model, &tokens, BATCH, ClipInterval::FULL, &mut rng, false).unwrap()
            })
        };
        let (with, without) = (terms(&padded), terms(&plain));
        let cols = with.size()[1] as usize;
        let first = SEQ - cols;
        let kept: Vec<f32> =
            tokens.chunks(SEQ).flat_map(|row| row[first..].iter().map(|&t| if t == PAD { 0.0 } else { 1.0 })).collect();
        let kept = Tensor::from_slice(&kept).reshape([BATCH as i64, cols as i64]);
        assert_close(&format!("{arch:?}: terms off the padding"), &with, &(&without * &kept), 0.0);
        assert!(without.abs().sum(Kind::Double).double_value(&[]) > with.abs().sum(Kind::Double).double_value(&[]));
        // Training counts every position but padding (AR: its targets 1..L); evaluation also
        // leaves position 0 out.
        let pads_in_targets = 6;
        assert_eq!(padded.counted_terms(&tokens, BATCH, false), BATCH * cols - pads_in_targets);
        assert_eq!(padded.counted_terms(&tokens, BATCH, true), BATCH * (SEQ - 1) - pads_in_targets);
        assert_eq!(plain.counted_terms(&tokens, BATCH, false), BATCH * cols);
    }
}
