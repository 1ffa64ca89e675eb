//! bd3's trainer: the BD3-LM model, its block-diffusion objective, the optimizer and the
//! training loop. Sections cited as §n refer to `shared/reference/bd3lm.md`.

pub mod config;
pub mod diffusion;
pub mod dist;
pub mod eval;
pub mod model;
pub mod optim;
pub mod rng;
pub mod sample;
pub mod state;
pub mod train;
pub mod zero;

pub use config::Config;
pub use model::Dit;
