//! The FLOP count behind MFU against a hand computation for the paper's small model
//! (d = 768, 12 layers, MLP ratio 4, conditioning 128, V = 50258, L = 1024, L′ = 16).

use trainer::config::{Arch, Config};
use trainer::flops::{forward_flops_per_sequence, mfu, training_flops_per_step};

#[test]
fn small_model_flops_match_a_hand_count() {
    let cfg = Config::from_toml_str("[train]\nmicro_batch = 16\n", &[]).unwrap();
    let f = forward_flops_per_sequence(&cfg).unwrap();
    // 12 layers × 2048 tokens × (QKV 6d² + out 2d² + MLP 16d²) with d² = 589,824.
    assert_eq!(f.dense, 347_892_350_976.0);
    // Visible pairs of the x_t ⊕ x_0 mask: L·L′ + L² = 1,064,960; × 12 layers × 4d.
    assert_eq!(f.attention, 39_258_685_440.0);
    // Logits at the 1024 positions of x_t: 2 · 768 · 50258 · 1024.
    assert_eq!(f.output, 79_048_998_912.0);
    // adaLN 12 × 2·128·4608, final 2·128·1536, σ-map 2·(256·128 + 128²).
    assert_eq!(f.conditioning, 14_647_296.0);
    // Forward + backward (3×) over 16 sequences on one rank; 8 ranks do 8× the work.
    assert_eq!(training_flops_per_step(&cfg, 1).unwrap(), 22_378_304_765_952.0);
    assert_eq!(training_flops_per_step(&cfg, 8).unwrap(), 8.0 * 22_378_304_765_952.0);
    // One H100 (989 TFLOP/s bf16) doing that step in 0.1 s would run at 22.6 % MFU.
    let u = mfu(22_378_304_765_952.0, 1, 0.1, 989e12);
    // 0.22627 is the value to five digits: within 5e-6.
    assert!((u - 0.226_27).abs() <= 5e-6, "{u}");
}

#[test]
fn ar_and_mdlm_count_their_own_passes() {
    let mut cfg = Config::from_toml_str("", &[]).unwrap();
    cfg.model.arch = Arch::Ar;
    // L − 1 = 1023 tokens, a causal mask of 1023·1024/2 pairs, logits at 1023 positions.
    let ar = forward_flops_per_sequence(&cfg).unwrap();
    assert_eq!((ar.total(), ar.conditioning), (272_056_587_264.0, 0.0));
    cfg.model.arch = Arch::Bd3;
    cfg.diffusion.block_size = 1024;
    // MDLM: one bidirectional pass over x_t: 1024 tokens, 1024² pairs.
    let mdlm = forward_flops_per_sequence(&cfg).unwrap();
    assert_eq!(mdlm.dense, 347_892_350_976.0 / 2.0);
    assert_eq!(mdlm.attention, 12.0 * 4.0 * 768.0 * 1024.0 * 1024.0);
}

/// The planner's parameter count is the built model's, for both architectures.
#[test]
fn the_planner_counts_the_parameters_of_the_built_model() {
    for arch in ["bd3", "ar"] {
        let sets = [
            format!("model.arch={arch:?}"),
            "model.hidden=64".into(),
            "model.heads=4".into(),
            "model.layers=3".into(),
            "model.cond_dim=32".into(),
            "model.vocab_size=1000".into(),
            "diffusion.mask_id=999".into(),
        ];
        let cfg = Config::from_toml_str("", &sets).unwrap();
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        trainer::Dit::new(&vs.root(), &cfg.model).unwrap();
        assert_eq!(trainer::plan::parameter_count(&cfg), trainer::model::num_parameters(&vs) as u64, "{arch}");
    }
}

/// The FLOP formulas against the model's own count of what its forward pass executed
/// (`count_forward_flops`, from the shapes each matrix product ran on), for BD3-LM, MDLM and AR
/// at the small model's width (2 layers and L = 256 keep it fast: both sides are linear in the
/// layers, and the attention pairs come from the same layout code the kernels run).
#[test]
fn the_formulas_count_what_the_model_executes() {
    use trainer::diffusion::{tokens_tensor, ClipInterval};
    use trainer::model::count_forward_flops;
    use trainer::objective::Objective;
    use trainer::rng::NoiseRng;

    for (arch, block) in [("bd3", 16), ("bd3", 256), ("ar", 16)] {
        let sets = [
            format!("model.arch={arch:?}"),
            "model.layers=2".into(),
            "model.seq_len=256".into(),
            format!("diffusion.block_size={block}"),
        ];
        let cfg = Config::from_toml_str("", &sets).unwrap();
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let model = trainer::Dit::new(&vs.root(), &cfg.model).unwrap();
        let batch = 2;
        let tokens: Vec<u32> = (0..batch * 256).map(|i| (i * 7919 % 50_000) as u32).collect();
        let formula = forward_flops_per_sequence(&cfg).unwrap();
        let what = format!("{arch}, L′ = {block}");
        let objective = Objective::new(&cfg).unwrap();
        let (masked, executed) = tch::no_grad(|| match objective.diffusion() {
            Some(obj) => {
                let noise =
                    obj.sample_noise(&tokens, batch, ClipInterval::FULL, &mut NoiseRng::new(3, 0, 0, 0)).unwrap();
                let x0 = tokens_tensor(&tokens, batch, 256, tch::Device::Cpu);
                let masked = noise.xt.iter().filter(|&&t| t == cfg.diffusion.mask_id).count();
                (masked, count_forward_flops(|| obj.token_losses(&model, &x0, &noise, false).unwrap()).1)
            }
            None => {
                let mut rng = NoiseRng::new(3, 0, 0, 0);
                let run =
                    || objective.token_losses(&model, &tokens, batch, ClipInterval::FULL, &mut rng, false).unwrap();
                (batch * 255, count_forward_flops(run).1)
            }
        });
        let b = batch as f64;
        // FLOP counts are integers below 2⁵³, summed exactly in fp64 by both sides, but for the
        // formula's few products and divisions (a few roundings of 1.1e-16 relative): 1e-9.
        let close = |a: f64, f: f64| (a - f).abs() <= 1e-9 * f;
        // Projections, adaLN and the σ-map: exactly the formula's dense and conditioning parts.
        let dense = b * (formula.dense + formula.conditioning);
        assert!(close(executed.dense, dense), "{what}: executed {} dense FLOPs, formula {dense}", executed.dense);
        assert!(close(executed.attention, b * formula.attention), "{what}: attention {executed:?} {formula:?}");
        // The output layer runs only where a loss is (masked tokens; every target for AR): the
        // formula counts it at all L positions, as the reference computes it.
        let (d, v) = (cfg.model.hidden as f64, cfg.model.vocab_size as f64);
        assert!(close(executed.output, 2.0 * d * v * masked as f64), "{what}: output {executed:?}, {masked} masked");
        assert!(executed.output <= b * formula.output, "{what}");
    }
}
