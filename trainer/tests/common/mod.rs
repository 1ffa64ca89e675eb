//! The tiny model the trainer's tests share.

use tch::{nn, Device};
use trainer::config::ModelConfig;
use trainer::model::Dit;

/// `base` shrunk to the tests' size: 32 wide, 2 layers, conditioning 16, no dropout.
pub fn tiny_model_config(base: ModelConfig, heads: usize, seq_len: usize) -> ModelConfig {
    ModelConfig { hidden: 32, layers: 2, heads, cond_dim: 16, dropout: 0.0, seq_len, ..base }
}

/// A model of `cfg` from seed `seed` whose trainable parameters are all drawn from U[−scale,
/// scale], the zero-initialized ones (adaLN, output layer) too, so that every parameter shapes
/// the output.
pub fn random_model(cfg: &ModelConfig, seed: i64, scale: f64) -> (nn::VarStore, Dit) {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Dit::new(&vs.root(), cfg).unwrap();
    tch::no_grad(|| {
        for mut t in vs.trainable_variables() {
            let _ = t.uniform_(-scale, scale);
        }
    });
    (vs, model)
}
