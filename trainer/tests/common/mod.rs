//! The tiny model the trainer's tests share.
// Each test crate uses only some of these.
#![allow(dead_code)]

use tch::{nn, Device};
use trainer::config::{ModelConfig, ParamDtype};
use trainer::model::Dit;

/// Tolerance of a computation against its reference, both run by the tiny model in fp64
/// (`model.dtype = "float64"`, u = 2⁻⁵³ ≈ 1.1e-16). Both
/// sides compute the same function in other orders (attention over other key sets and shapes,
/// gathered rows instead of dense ones), so each of their roundings differs by at most about
/// n·u relative for inner products of n ≤ 32 terms (2·SEQ keys, 32 hidden): 3.5e-15. Through
/// the 2 layers (a handful of such products each), and the loss weight 1/t ≤ 1000 on terms of
/// magnitude ≤ 10, that is below 1e-10 for loss terms and gradients; 1e-9 leaves a factor 10 for
/// the network's amplification, and is 1e4 below the fp32 rounding these tests used to allow, so
/// no CPU's GEMM kernels can decide the outcome.
pub const REFERENCE_TOLERANCE: f64 = 1e-9;

/// `base` shrunk to the tests' size: 32 wide, 2 layers, conditioning 16, no dropout, in fp64 (so
/// that comparisons against references hold to [`REFERENCE_TOLERANCE`], and sampled tokens
/// agree exactly, on any CPU).
pub fn tiny_model_config(base: ModelConfig, heads: usize, seq_len: usize) -> ModelConfig {
    ModelConfig {
        hidden: 32,
        layers: 2,
        heads,
        cond_dim: 16,
        dropout: 0.0,
        seq_len,
        dtype: ParamDtype::Float64,
        ..base
    }
}

/// A model of `cfg` from seed `seed` whose trainable parameters are all drawn from U[−scale,
/// scale], the zero-initialized ones (adaLN, output layer) too, so that every parameter shapes
/// the output.
pub fn random_model(cfg: &ModelConfig, seed: i64, scale: f64) -> (nn::VarStore, Dit) {
    tch::manual_seed(seed);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = Dit::build(&mut vs, cfg).unwrap();
    tch::no_grad(|| {
        for mut t in vs.trainable_variables() {
            let _ = t.uniform_(-scale, scale);
        }
    });
    (vs, model)
}
