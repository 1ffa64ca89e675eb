//! The training state as one checkpointable unit: the model's parameters and buffers, the EMA
//! weights, the optimizer's moments and counters, and the progress (step, data position, clip
//! interval). Each part is [`Stateful`]; [`TrainState`] holds them all, assembled once per run.
//! Tensors become named host byte buffers (`checkpoint::TensorBuffer`); everything else is a small
//! JSON value in the manifest.
//!
//! Names follow the published checkpoints' keys (docs/algorithm.md §1.7) under a component
//! prefix: `model.<key>`, `ema.<key>`, `optim.exp_avg.<key>`, `optim.exp_avg_sq.<key>`. Exported
//! weights drop the prefix.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Result};
use checkpoint::{CheckpointMeta, LocalTensor, Manifest};
use tch::{nn, Tensor};

use crate::config::Config;
use crate::optim::Ema;
use crate::optimizer::Optimizer;
pub use crate::progress::{progress_of, Progress};
use crate::stateful::{replicated_parts, Params, Stateful, Stored};

/// Everything a training run checkpoints.
pub struct TrainState {
    /// The model's parameters and buffers (the clip interval among them).
    pub vs: nn::VarStore,
    /// Its trainable parameters, in the order of `optimizer` and `ema`.
    pub params: Params,
    pub optimizer: Optimizer,
    pub ema: Ema,
    pub progress: Progress,
}

impl TrainState {
    /// The parts, in the order they load: the EMA may start from the loaded weights.
    fn parts(&self) -> [&dyn Stateful; 4] {
        [&self.vs, &self.ema, &self.optimizer, &self.progress]
    }

    /// Host copies of this rank's part of every tensor (see each part), and the manifest values.
    pub fn snapshot(
        &self,
        rank: usize,
        world: usize,
    ) -> Result<(Vec<LocalTensor>, BTreeMap<String, serde_json::Value>)> {
        let (mut tensors, mut values) = (vec![], BTreeMap::new());
        for part in self.parts() {
            tensors.extend(part.save_tensors(&self.params, rank, world)?);
            values.extend(part.save_values()?);
        }
        Ok((tensors, values))
    }

    /// Loads every part from a committed checkpoint. One without optimizer state (imported
    /// weights) leaves the optimizer fresh; without EMA, the EMA starts from the loaded weights.
    pub fn load(&mut self, from: &Stored<'_>) -> Result<()> {
        let Self { vs, params, optimizer, ema, progress } = self;
        let parts: [&mut dyn Stateful; 4] = [vs, ema, optimizer, progress];
        for part in parts {
            part.load(params, from)?;
        }
        Ok(())
    }
}

/// The model's variables (parameters and buffers) as `model.<name>`, every one required.
impl Stateful for nn::VarStore {
    fn save_tensors(&self, _: &Params, rank: usize, world: usize) -> Result<Vec<LocalTensor>> {
        let mut vars: Vec<(String, Tensor)> = self.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        replicated_parts(vars.into_iter().map(|(name, t)| (format!("model.{name}"), t)).collect(), rank, world)
    }

    fn load(&mut self, _: &Params, from: &Stored<'_>) -> Result<()> {
        let mut targets = vec![];
        for (name, t) in self.variables() {
            let key = format!("model.{name}");
            ensure!(from.has(&key), "step {} has no tensor `{key}`", from.manifest.step);
            targets.push((key, t));
        }
        from.load_whole(&targets)
    }
}

/// The progress is the manifest value `progress`; a checkpoint without one (imported weights)
/// leaves it as it is (a fresh start).
impl Stateful for Progress {
    fn save_values(&self) -> Result<Vec<(String, serde_json::Value)>> {
        Ok(vec![("progress".to_string(), serde_json::to_value(self)?)])
    }

    fn load(&mut self, _: &Params, from: &Stored<'_>) -> Result<()> {
        if let Some(progress) = from.progress()? {
            *self = progress;
        }
        Ok(())
    }
}

/// The model fields that decide tensor shapes: a checkpoint whose config differs in one of
/// these cannot be loaded.
const SHAPE_FIELDS: [&str; 7] = ["arch", "hidden", "layers", "heads", "cond_dim", "mlp_ratio", "vocab_size"];

/// Refuses to load a checkpoint trained with a model of other shapes, naming the field.
pub fn check_compatible(cfg: &Config, manifest: &Manifest) -> Result<()> {
    let ours = serde_json::to_value(&cfg.model)?;
    let theirs = &manifest.meta.config["model"];
    for field in SHAPE_FIELDS {
        if !theirs[field].is_null() && theirs[field] != ours[field] {
            bail!(
                "checkpoint step {} was trained with model.{field} = {}, this config has model.{field} = {}: \
                 the shapes differ, so it cannot be loaded",
                manifest.step,
                theirs[field],
                ours[field]
            );
        }
    }
    Ok(())
}

/// The manifest's run-level facts, with the parts' `values` (see [`TrainState::snapshot`]).
pub fn checkpoint_meta(
    cfg: &Config,
    tokens_seen: u64,
    values: BTreeMap<String, serde_json::Value>,
) -> Result<CheckpointMeta> {
    let config = serde_json::to_value(cfg)?;
    let mut state = values;
    // The diffusion noise is a function of (seed, stream, step, micro-batch) and libtorch's
    // generator is re-seeded from (seed, step) every step, so the step is the whole RNG state.
    state.insert("rng".to_string(), serde_json::json!({ "seed": cfg.train.seed, "kind": "counter-based per step" }));
    state.insert(
        "lr_schedule".to_string(),
        serde_json::json!({ "base": cfg.optim.lr, "warmup": cfg.optim.warmup_steps }),
    );
    Ok(CheckpointMeta {
        tokens_seen,
        config,
        config_hash: config_hash(cfg)?,
        git_commit: crate::weights::binary_commit().to_string(),
        state,
    })
}

/// The hash that identifies a config in manifests and `run.json` (FNV-1a of its JSON form).
pub fn config_hash(cfg: &Config) -> Result<String> {
    Ok(format!("{:016x}", fnv1a(&serde_json::to_vec(&serde_json::to_value(cfg)?)?)))
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}
