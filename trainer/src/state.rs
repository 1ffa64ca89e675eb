//! The training state as one checkpointable unit: parameters and buffers, EMA weights, AdamW
//! moments and counters, the data position, the clip interval and the step. Tensors become
//! named host byte buffers (`checkpoint::TensorBuffer`); everything else is a small JSON value in
//! the manifest.
//!
//! Names follow the reference's keys (§1.7) under a component prefix: `model.<key>`,
//! `ema.<key>`, `optim.exp_avg.<key>`, `optim.exp_avg_sq.<key>`. Exported weights drop the prefix.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use checkpoint::safetensors::TensorView;
use checkpoint::{CheckpointMeta, CheckpointStore, DType, LocalTensor, Manifest, Slice, TensorBuffer};
use dataloader::LoaderState;
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::config::Config;
use crate::diffusion::ClipInterval;
use crate::optim::Ema;
use crate::zero::Optimizer;

/// The small, non-tensor part of the state.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Optimizer steps completed.
    pub step: u64,
    pub tokens_seen: u64,
    pub optimizer_steps: u64,
    pub ema_updates: u64,
    pub clip_beta: f64,
    pub clip_omega: f64,
    pub data: LoaderState,
}

impl Progress {
    pub fn clip(&self) -> ClipInterval {
        ClipInterval { beta: self.clip_beta, omega: self.clip_omega }
    }
}

/// Borrowed views of everything a checkpoint holds.
pub struct TrainState<'a> {
    pub vs: &'a nn::VarStore,
    /// Trainable parameters by name, in the order of `optimizer` and `ema`.
    pub names: &'a [String],
    /// Replicated moments are saved like the weights; ZeRO shards as the boxes they cover.
    pub optimizer: &'a mut Optimizer,
    pub ema: &'a mut Ema,
}

pub fn dtype_of(kind: Kind) -> Result<DType> {
    Ok(match kind {
        Kind::Float => DType::F32,
        Kind::Double => DType::F64,
        Kind::BFloat16 => DType::BF16,
        Kind::Half => DType::F16,
        Kind::Int64 => DType::I64,
        Kind::Int => DType::I32,
        Kind::Uint8 => DType::U8,
        Kind::Bool => DType::Bool,
        other => bail!("tensors of kind {other:?} cannot be checkpointed"),
    })
}

pub fn kind_of(dtype: DType) -> Kind {
    match dtype {
        DType::F32 => Kind::Float,
        DType::F64 => Kind::Double,
        DType::BF16 => Kind::BFloat16,
        DType::F16 => Kind::Half,
        DType::I64 => Kind::Int64,
        DType::I32 => Kind::Int,
        DType::U8 => Kind::Uint8,
        DType::Bool => Kind::Bool,
    }
}

/// Copies a tensor to host memory (the only part of a save that blocks training).
pub fn to_buffer(name: &str, t: &Tensor) -> Result<TensorBuffer> {
    let host = t.detach().to_device(Device::Cpu).contiguous();
    let dtype = dtype_of(host.kind())?;
    let shape: Vec<usize> = host.size().iter().map(|&d| d as usize).collect();
    let numel = shape.iter().product::<usize>();
    let mut data = vec![0u8; numel * dtype.size_bytes()];
    host.f_copy_data_u8(&mut data, numel).with_context(|| format!("copying tensor `{name}` to host memory"))?;
    Ok(TensorBuffer::new(name, dtype, shape, data)?)
}

/// Copies a stored buffer into an existing tensor of the same shape and dtype.
pub fn load_into(target: &Tensor, buffer: &TensorBuffer) -> Result<()> {
    let shape: Vec<usize> = target.size().iter().map(|&d| d as usize).collect();
    ensure!(
        buffer.shape == shape,
        "tensor `{}`: the checkpoint holds shape {:?}, the model expects {shape:?}",
        buffer.name,
        buffer.shape
    );
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    // Stored bf16 weights (as published) load into an fp32 model and vice versa.
    let src = Tensor::from_data_size(&buffer.data, &dims, kind_of(buffer.dtype))
        .to_kind(target.kind())
        .to_device(target.device());
    tch::no_grad(|| target.shallow_clone().copy_(&src));
    Ok(())
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

impl TrainState<'_> {
    /// Host copies of this rank's part of every tensor: rows split evenly across the `world`
    /// ranks (data-parallel ranks hold the same replicated state, so each writes a disjoint
    /// part and together they write it once). With ZeRO, the moments are the boxes of the global
    /// moment tensors that this rank's shard covers (`ZeroAdamW::moment_parts`).
    pub fn snapshot(&self, rank: usize, world: usize) -> Result<Vec<LocalTensor>> {
        let mut named: Vec<(String, Tensor)> = vec![];
        let mut vars: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, t) in vars {
            named.push((format!("model.{name}"), t));
        }
        for (i, name) in self.names.iter().enumerate() {
            named.push((format!("ema.{name}"), self.ema.shadow[i].shallow_clone()));
            if let Optimizer::Replicated(r) = &*self.optimizer {
                named.push((format!("optim.exp_avg.{name}"), r.adam.exp_avg[i].shallow_clone()));
                named.push((format!("optim.exp_avg_sq.{name}"), r.adam.exp_avg_sq[i].shallow_clone()));
            }
        }
        let mut out = match &*self.optimizer {
            Optimizer::Zero(zero) => zero.moment_parts(self.names)?,
            Optimizer::Replicated(_) => vec![],
        };
        for (name, t) in named {
            let global: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
            let Some(part) = Slice::rows_part(&global, rank, world) else { continue };
            let local = match global.first() {
                Some(_) => t.narrow(0, part.offsets[0] as i64, part.shape[0] as i64),
                None => t,
            };
            out.push(LocalTensor { buffer: to_buffer(&name, &local)?, global_shape: global, offsets: part.offsets });
        }
        Ok(out)
    }

    /// Loads every tensor of the checkpoint into place. A checkpoint without optimizer state
    /// (imported weights) leaves the optimizer fresh; without EMA, the EMA starts from the weights.
    pub fn load(&mut self, store: &CheckpointStore, manifest: &Manifest) -> Result<()> {
        let mut targets: Vec<(String, Tensor)> = vec![];
        for (name, t) in self.vs.variables() {
            ensure!(
                manifest.tensors.contains_key(&format!("model.{name}")),
                "step {} has no tensor `model.{name}`",
                manifest.step
            );
            targets.push((format!("model.{name}"), t));
        }
        for (i, name) in self.names.iter().enumerate() {
            let ema = format!("ema.{name}");
            if !manifest.tensors.contains_key(&ema) {
                let live = self.vs.variables()[name].detach().copy();
                tch::no_grad(|| self.ema.shadow[i].copy_(&live));
            }
            targets.push((ema, self.ema.shadow[i].shallow_clone()));
            if let Optimizer::Replicated(r) = &*self.optimizer {
                targets.push((format!("optim.exp_avg.{name}"), r.adam.exp_avg[i].shallow_clone()));
                targets.push((format!("optim.exp_avg_sq.{name}"), r.adam.exp_avg_sq[i].shallow_clone()));
            }
        }
        if let Optimizer::Zero(zero) = &mut *self.optimizer {
            zero.load_moments(store, manifest, self.names)?;
        }
        targets.retain(|(key, _)| manifest.tensors.contains_key(key));
        let requests: Vec<(String, Slice)> =
            targets.iter().map(|(key, _)| (key.clone(), Slice::whole(&manifest.tensors[key].shape))).collect();
        let buffers = store.read_many(manifest, &requests)?;
        for ((_, target), buffer) in targets.iter().zip(&buffers) {
            load_into(target, buffer)
                .with_context(|| format!("loading step {} from {}", manifest.step, store.url()))?;
        }
        Ok(())
    }
}

/// The manifest's run-level facts for `progress`.
pub fn checkpoint_meta(cfg: &Config, progress: &Progress) -> Result<CheckpointMeta> {
    let config = serde_json::to_value(cfg)?;
    let canonical = serde_json::to_vec(&config)?;
    let mut state = BTreeMap::new();
    state.insert("progress".to_string(), serde_json::to_value(progress)?);
    // The diffusion noise is a function of (seed, stream, step, micro-batch) and libtorch's
    // generator is re-seeded from (seed, step) every step, so the step is the whole RNG state.
    state.insert("rng".to_string(), serde_json::json!({ "seed": cfg.train.seed, "kind": "counter-based per step" }));
    state.insert(
        "lr_schedule".to_string(),
        serde_json::json!({ "base": cfg.optim.lr, "warmup": cfg.optim.warmup_steps }),
    );
    Ok(CheckpointMeta {
        tokens_seen: progress.tokens_seen,
        config,
        config_hash: format!("{:016x}", fnv1a(&canonical)),
        git_commit: binary_commit().to_string(),
        state,
    })
}

/// The progress recorded in a manifest.
pub fn progress_of(manifest: &Manifest) -> Result<Option<Progress>> {
    match manifest.meta.state.get("progress") {
        None => Ok(None),
        Some(v) => Ok(Some(
            serde_json::from_value(v.clone())
                .with_context(|| format!("step {}: manifest field `progress`", manifest.step))?,
        )),
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Writes one safetensors file with the reference's key names (§1.7): the EMA weights, or the
/// raw ones with `raw`, plus the model's buffers. Keys are sorted, so the same checkpoint always
/// exports the same bytes.
pub fn export_weights(store: &CheckpointStore, manifest: &Manifest, raw: bool, out: &Path) -> Result<usize> {
    let mut tensors = vec![];
    for (name, entry) in &manifest.tensors {
        let Some(key) = name.strip_prefix("model.") else { continue };
        let ema = format!("ema.{key}");
        let source = if !raw && manifest.tensors.contains_key(&ema) { ema } else { name.clone() };
        let buffer = store.read(manifest, &source, &Slice::whole(&entry.shape))?;
        tensors.push((key.to_string(), buffer));
    }
    ensure!(!tensors.is_empty(), "step {} of {} holds no model weights", manifest.step, store.url());
    let views: Vec<TensorView<'_>> = tensors
        .iter()
        .map(|(key, b)| TensorView { name: key, dtype: b.dtype, shape: &b.shape, data: b.data.clone().into() })
        .collect();
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = checkpoint::safetensors::encode(&views, &metadata)?.concat();
    std::fs::write(out, bytes).with_context(|| format!("writing {}", out.display()))?;
    Ok(tensors.len())
}

/// Turns a safetensors file of weights (an export, or published BD3-LM weights) into a
/// committed checkpoint at `step`: the weights become both the model and the EMA weights; there
/// is no optimizer state, so training from it starts the optimizer fresh. With `cfg`, every key
/// and shape is checked against the model that config builds, and the config is recorded.
pub fn import_weights(file: &Path, store: &CheckpointStore, step: u64, cfg: Option<&Config>) -> Result<Manifest> {
    let name = file.display().to_string();
    let bytes = std::fs::read(file).with_context(|| format!("reading {name}"))?;
    let header = checkpoint::safetensors::parse(&bytes, &name)?;
    if let Some(cfg) = cfg {
        let vs = nn::VarStore::new(Device::Cpu);
        crate::model::Dit::new(&vs.root(), &cfg.model)?;
        let expected: BTreeMap<String, Vec<usize>> =
            vs.variables().into_iter().map(|(k, t)| (k, t.size().iter().map(|&d| d as usize).collect())).collect();
        for (key, shape) in &expected {
            let entry =
                header.tensors.get(key).with_context(|| format!("{name}: no tensor `{key}` (the model needs it)"))?;
            ensure!(
                &entry.shape == shape,
                "{name}: tensor `{key}` has shape {:?}, the model needs {shape:?}",
                entry.shape
            );
        }
        if let Some(extra) = header.tensors.keys().find(|k| !expected.contains_key(*k)) {
            bail!("{name}: tensor `{extra}` is not part of the model this config builds");
        }
    }
    let mut tensors = vec![];
    for (key, entry) in &header.tensors {
        let range = header.byte_range(key).expect("parsed entry");
        let data = bytes[range.start as usize..range.end as usize].to_vec();
        for prefix in ["model", "ema"] {
            let buffer = TensorBuffer::new(format!("{prefix}.{key}"), entry.dtype, entry.shape.clone(), data.clone())?;
            tensors.push(LocalTensor::whole(buffer));
        }
    }
    let meta = CheckpointMeta {
        config: cfg.map(serde_json::to_value).transpose()?.unwrap_or_default(),
        git_commit: binary_commit().to_string(),
        state: BTreeMap::from([("imported_from".to_string(), serde_json::json!(name))]),
        ..Default::default()
    };
    let manifest = store.save(step, 0, 1, tensors, Some(meta), Default::default())?;
    Ok(manifest.expect("rank 0 commits"))
}

static BINARY_COMMIT: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Records the git commit of the running binary (the launcher knows it) for manifests.
pub fn set_binary_commit(commit: &str) {
    let _ = BINARY_COMMIT.set(commit.to_string());
}

fn binary_commit() -> &'static str {
    BINARY_COMMIT.get().map_or("unknown", String::as_str)
}
