//! The KV-cache sampler against the uncached reference, and its accounting (docs/algorithm.md §5).

mod common;

use tch::{nn, Device};
use trainer::config::{Arch, Config, ModelConfig};
use trainer::model::Dit;
use trainer::sample::{generate, Algorithm, SampleOptions, StopReason};

/// A small random model on the full GPT-2 vocabulary (BOS/EOS 50256, [MASK] 50257).
fn random_model(arch: Arch, block_size: usize, seq_len: usize) -> (nn::VarStore, Dit, Config) {
    let mut cfg = Config::from_toml_str("", &[]).unwrap();
    cfg.model = common::tiny_model_config(ModelConfig { arch, ..cfg.model }, 2, seq_len);
    cfg.diffusion.block_size = block_size;
    let (vs, model) = common::random_model(&cfg.model, block_size as i64, 0.5);
    (vs, model, cfg)
}

fn options(cfg: &Config, len: usize, batch: usize) -> SampleOptions {
    SampleOptions { batch, nucleus_p: 0.95, ..SampleOptions::from_config(cfg, len) }
}

#[test]
fn kv_cache_gives_the_tokens_of_recomputing_the_window() {
    for block_size in [1, 4, 16] {
        // Exact up to the context length. Once the window slides, the cache keeps keys/values
        // computed while older blocks were still visible (as the reference's cache does), which
        // recomputing the window cannot reproduce; `long_generation_slides_the_window` covers it.
        let (_vs, model, cfg) = random_model(Arch::Bd3, block_size, 64);
        let cached = options(&cfg, 64, 2);
        let uncached = SampleOptions { kv_cache: false, ..cached.clone() };
        let a = generate(&model, &cfg, &cached, Device::Cpu).unwrap();
        let b = generate(&model, &cfg, &uncached, Device::Cpu).unwrap();
        assert_eq!(a.samples, b.samples, "L'={block_size}");
        assert_eq!(a.nfe, b.nfe);
        assert!(a.samples.iter().all(|s| s.tokens.len() == 64 && s.tokens[0] == 50256 && s.stop == StopReason::Length));
        assert!(a.samples.iter().flat_map(|s| &s.tokens).all(|&t| t != 50257), "no [MASK] left");
        assert_ne!(a.samples[0].tokens, a.samples[1].tokens, "rows of a batch differ");
    }
}

#[test]
fn first_hitting_unmasks_one_position_per_call() {
    let (_vs, model, cfg) = random_model(Arch::Bd3, 4, 32);
    let opts = options(&cfg, 40, 3);
    let g = generate(&model, &cfg, &opts, Device::Cpu).unwrap();
    assert_eq!(g.nfe, 39, "one call per generated token (BOS is given)");
    assert_eq!(g.unmasked_per_call.len(), g.nfe);
    assert!(g.unmasked_per_call.iter().all(|&n| n == 3), "one position per row per call");
}

#[test]
fn ancestral_reuses_outputs_and_matches_calling_every_step() {
    let (_vs, model, cfg) = random_model(Arch::Bd3, 4, 32);
    let steps = 100;
    let reuse = SampleOptions { algorithm: Algorithm::Ancestral, steps, ..options(&cfg, 32, 2) };
    let every_step = SampleOptions { reuse_outputs: false, ..reuse.clone() };
    let a = generate(&model, &cfg, &reuse, Device::Cpu).unwrap();
    let b = generate(&model, &cfg, &every_step, Device::Cpu).unwrap();
    assert_eq!(a.samples, b.samples);
    let blocks = 32 / 4;
    // At most one call per change: ≤ L′ × batch calls per block, against ~T without reuse.
    assert!(a.nfe <= blocks * 4 * 2, "{} calls", a.nfe);
    assert!(b.nfe > 10 * a.nfe, "{} vs {} calls", b.nfe, a.nfe);
    assert_eq!(a.unmasked_per_call.iter().sum::<usize>(), 2 * (32 - 1));
    assert!(a.unmasked_per_call.iter().all(|&n| n > 0), "every call changed the sequence");
}

#[test]
fn long_generation_slides_the_window() {
    let (_vs, model, cfg) = random_model(Arch::Bd3, 8, 16);
    let g = generate(&model, &cfg, &options(&cfg, 4 * 16, 1), Device::Cpu).unwrap();
    assert_eq!(g.samples[0].tokens.len(), 64);
    assert_eq!(g.nfe, 63);
}

#[test]
fn ar_model_samples_with_its_own_cache() {
    let (_vs, model, cfg) = random_model(Arch::Ar, 1, 40);
    let cached = options(&cfg, 40, 2);
    let uncached = SampleOptions { kv_cache: false, ..cached.clone() };
    let a = generate(&model, &cfg, &cached, Device::Cpu).unwrap();
    let b = generate(&model, &cfg, &uncached, Device::Cpu).unwrap();
    assert_eq!(a.samples, b.samples);
    assert_eq!(a.nfe, 39);
    // Past the context the window slides and generation goes on.
    let long = generate(&model, &cfg, &options(&cfg, 100, 1), Device::Cpu).unwrap();
    assert_eq!((long.samples[0].tokens.len(), long.nfe), (100, 99));
}

/// A model that always predicts `token` (a large output bias), to drive the stopping rules.
fn biased_model(token: i64) -> (nn::VarStore, Dit, Config) {
    let (vs, model, cfg) = random_model(Arch::Bd3, 16, 512);
    tch::no_grad(|| {
        let _ = vs.variables()["backbone.output_layer.linear.bias"].narrow(0, token, 1).fill_(100.0);
    });
    (vs, model, cfg)
}

#[test]
fn variable_length_stops_at_the_first_generated_eos() {
    let (_vs, model, cfg) = biased_model(50256);
    let opts = SampleOptions { var_length: true, ..options(&cfg, 512, 1) };
    let g = generate(&model, &cfg, &opts, Device::Cpu).unwrap();
    assert_eq!(g.samples[0].stop, StopReason::Eos);
    assert_eq!(g.samples[0].tokens, vec![50256, 50256], "BOS, then the EOS that ends it");
    assert_eq!(g.nfe, 15, "one block");
    // Without variable length the same model fills the requested length.
    let fixed = generate(&model, &cfg, &options(&cfg, 48, 1), Device::Cpu).unwrap();
    assert_eq!((fixed.samples[0].tokens.len(), fixed.samples[0].stop), (48, StopReason::Length));
}

#[test]
fn variable_length_stops_on_low_entropy_and_drops_the_last_256_tokens() {
    let (_vs, model, cfg) = biased_model(42);
    let opts = SampleOptions { var_length: true, ..options(&cfg, 512, 1) };
    let g = generate(&model, &cfg, &opts, Device::Cpu).unwrap();
    // After 17 blocks (272 tokens) the last 256 are all token 42: entropy 0 < 4 nats.
    assert_eq!(g.samples[0].stop, StopReason::LowEntropy);
    assert_eq!(g.samples[0].tokens.len(), 272 - 256);
    assert_eq!(g.nfe, 271);
}

/// A model whose vocabulary does not hold GPT-2's BOS gets an error, not a panic in libtorch.
#[test]
fn a_vocabulary_without_the_bos_id_is_a_clear_error() {
    let sets = ["model.vocab_size=1000".to_string(), "diffusion.mask_id=999".into()];
    let mut cfg = Config::from_toml_str("", &sets).unwrap();
    cfg.model = common::tiny_model_config(cfg.model, 2, 64);
    let (_vs, model) = common::random_model(&cfg.model, 1, 0.5);
    let err = generate(&model, &cfg, &options(&cfg, 8, 1), Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("BOS id 50256") && err.contains("model.vocab_size (1000)"), "{err}");

    // With the vocabulary's own ids (data.bos_id / data.eos_id) it samples, from that BOS.
    (cfg.data.bos_id, cfg.data.eos_id) = (Some(3), Some(4));
    let opts = SampleOptions { var_length: true, ..options(&cfg, 40, 2) };
    let g = generate(&model, &cfg, &opts, Device::Cpu).unwrap();
    for s in &g.samples {
        assert_eq!(s.tokens[0], 3);
        assert!(s.tokens.iter().all(|&t| t < 999), "no [MASK] and nothing past the vocabulary: {:?}", s.tokens);
        // Variable length stops at the configured EOS, not GPT-2's.
        if let Some(i) = s.tokens.iter().skip(1).position(|&t| t == 4) {
            assert_eq!(s.tokens.len(), i + 2, "{:?}", s.tokens);
        }
    }
}
