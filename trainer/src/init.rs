//! `--init-from` (`train.init_from`): a run that starts from another run's weights, as the
//! paper's second stage starts from the first (docs/algorithm.md §8, "Two stages"). Only the
//! weights carry over: the optimizer starts with zero moments at step 0, the EMA restarts from
//! the loaded weights, the clip interval is the config's `diffusion.sampling_eps_min/max`, and
//! the data order is the fresh one of step 0.
//!
//! The source is a checkpoint location (its newest committed step that verifies, or one step
//! directory `…/step-NNNNNNNNNN`), whose EMA weights are taken when it has them (the weights the
//! paper releases and fine-tunes from), or a `.safetensors` file of weights with the reference's
//! key names (`bd3 ckpt export`, `model.safetensors` of a run, published weights). Every tensor
//! of the model must be there with the model's shape, but for the buffers a weights file may
//! lack (the clip interval, which is reset anyway, and the rotary frequencies, recomputed);
//! a mismatch names the tensor and both shapes.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use checkpoint::{CheckpointStore, Manifest};
use tch::Tensor;

use crate::config::Config;
use crate::optim::Ema;
use crate::state::TrainState;
use crate::stateful::Stored;
use crate::weights::{self, OPTIONAL_BUFFERS};

/// Loads the weights `source` names into `state` and restarts the EMA from them. The optimizer
/// and the progress are left as a fresh run built them. Returns what was loaded, for the log.
pub fn init_from(source: &str, cfg: &Config, state: &mut TrainState) -> Result<String> {
    let loaded = if source.ends_with(".safetensors") {
        ensure!(
            !source.contains("://"),
            "train.init_from {source}: a .safetensors file must be a local path (from an object store, \
             give the checkpoint location, or download the file first)"
        );
        let path = Path::new(source);
        ensure!(path.is_file(), "train.init_from: no weights file {source}");
        weights::load_weights(&state.vs, path, &cfg.diffusion).with_context(|| format!("train.init_from {source}"))?;
        format!("weights file {source}")
    } else {
        let (store, manifest) = checkpoint_of(source)?;
        load_checkpoint_weights(&store, &manifest, state).with_context(|| format!("train.init_from {source}"))?;
        format!("step {} of {}", manifest.step, store.url())
    };
    // The EMA restarts from the loaded weights, with its warm-up (docs/algorithm.md §8).
    state.ema = Ema::new(&state.params.tensors, cfg.optim.ema_decay);
    Ok(loaded)
}

/// The checkpoint `source` names: a step directory `…/step-NNNNNNNNNN` of a checkpoint location,
/// or the location itself (its newest committed step whose files verify).
fn checkpoint_of(source: &str) -> Result<(CheckpointStore, Manifest)> {
    let trimmed = source.trim_end_matches('/');
    let step_dir = trimmed.rsplit_once('/').and_then(|(parent, last)| {
        let step = last.strip_prefix("step-")?.parse::<u64>().ok()?;
        Some((parent, step))
    });
    if let Some((parent, step)) = step_dir {
        let store = CheckpointStore::open(parent).with_context(|| format!("train.init_from {source}"))?;
        ensure!(
            store.committed_steps()?.contains(&step),
            "train.init_from {source}: step {step} of {parent} is not a committed checkpoint"
        );
        let manifest = store.manifest(step)?;
        store.verify(&manifest).with_context(|| format!("train.init_from {source}"))?;
        return Ok((store, manifest));
    }
    if !trimmed.contains("://") {
        ensure!(
            Path::new(trimmed).is_dir(),
            "train.init_from: {source} is neither a checkpoint directory nor a .safetensors file"
        );
    }
    let store = CheckpointStore::open(trimmed).with_context(|| format!("train.init_from {source}"))?;
    let point = store.latest_valid()?;
    match point.manifest {
        Some(manifest) => Ok((store, manifest)),
        None if point.skipped.is_empty() => {
            bail!("train.init_from: {source} holds no committed checkpoint (expected a checkpoint location or a .safetensors file)")
        }
        None => bail!("train.init_from: no checkpoint in {source} verifies: {:?}", point.skipped),
    }
}

/// Copies the checkpoint's weights (`ema.<key>` where present, else `model.<key>`) into the
/// model's variables, after checking every name and shape.
fn load_checkpoint_weights(store: &CheckpointStore, manifest: &Manifest, state: &TrainState) -> Result<()> {
    let step = manifest.step;
    let mut variables: Vec<(String, Tensor)> = state.vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    // Weights of another architecture (an AR run's into a BD3-LM, say) are refused by name.
    let extra: Vec<&str> = manifest
        .tensors
        .keys()
        .filter_map(|k| k.strip_prefix("model."))
        .filter(|k| !variables.iter().any(|(name, _)| name == k))
        .collect();
    if let Some(first) = extra.first() {
        bail!(
            "step {step} holds tensor `{first}`, which is not part of the model this config builds \
             (all such tensors: {extra:?}); is it a checkpoint of another architecture?"
        );
    }
    let mut targets = vec![];
    for (name, target) in variables {
        let key =
            [format!("ema.{name}"), format!("model.{name}")].into_iter().find(|k| manifest.tensors.contains_key(k));
        let Some(key) = key else {
            if OPTIONAL_BUFFERS.contains(&name.as_str()) {
                continue; // the clip interval is reset below, the rotary frequencies recomputed
            }
            bail!("step {step} has no tensor `{name}` (the model this config builds needs it)");
        };
        let stored = &manifest.tensors[&key].shape;
        let needed: Vec<usize> = target.size().iter().map(|&d| d as usize).collect();
        ensure!(
            *stored == needed,
            "tensor `{name}` has shape {stored:?} in step {step}, this config's model needs {needed:?} \
             (the model fields of the two configs differ)"
        );
        targets.push((key, target));
    }
    Stored { store, manifest }.load_whole(&targets)
}
