//! The one interface of everything a checkpoint holds ([`Stateful`], as torchtitan's), and the
//! conversions between libtorch tensors and the checkpoint crate's named host byte buffers.
//!
//! A component saves tensors (this rank's part of each, under its checkpoint names) and small
//! JSON values (in the manifest's `state` map), and loads itself back from a committed
//! checkpoint. `state::TrainState` is the list of components a training run saves as one unit.

use anyhow::{bail, ensure, Context, Result};
use checkpoint::{CheckpointStore, DType, LocalTensor, Manifest, Slice, TensorBuffer};
use tch::{nn, Device, Kind, Tensor};

use crate::progress::{progress_of, Progress};

/// Something a checkpoint saves and restores. `params` are the model's trainable parameters,
/// which name the per-parameter state of optimizers and the EMA.
pub trait Stateful {
    /// This rank's part of every tensor the component saves, under its checkpoint names.
    fn save_tensors(&self, _params: &Params, _rank: usize, _world: usize) -> Result<Vec<LocalTensor>> {
        Ok(vec![])
    }

    /// Small values for the manifest's `state` map, by key.
    fn save_values(&self) -> Result<Vec<(String, serde_json::Value)>> {
        Ok(vec![])
    }

    /// Restores the component from a committed checkpoint.
    fn load(&mut self, params: &Params, from: &Stored<'_>) -> Result<()>;
}

/// The trainable parameters sorted by name: the stable order in which the optimizer and the EMA
/// keep their per-parameter state.
pub struct Params {
    pub names: Vec<String>,
    pub tensors: Vec<Tensor>,
}

impl Params {
    pub fn of(vs: &nn::VarStore) -> Self {
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let (names, tensors) = named.into_iter().unzip();
        Self { names, tensors }
    }
}

/// A committed checkpoint to load from.
#[derive(Clone, Copy)]
pub struct Stored<'a> {
    pub store: &'a CheckpointStore,
    pub manifest: &'a Manifest,
}

impl Stored<'_> {
    /// The progress the manifest records (absent in imported weights).
    pub fn progress(&self) -> Result<Option<Progress>> {
        progress_of(self.manifest)
    }

    /// Whether the checkpoint holds a tensor of this name.
    pub fn has(&self, name: &str) -> bool {
        self.manifest.tensors.contains_key(name)
    }

    /// Copies the whole stored tensor of each name into its target (same shape; any float dtype
    /// converts), in one batched read.
    pub fn load_whole(&self, targets: &[(String, Tensor)]) -> Result<()> {
        let requests: Vec<(String, Slice)> = targets
            .iter()
            .map(|(name, _)| {
                let entry = self.manifest.tensors.get(name).with_context(|| {
                    format!("step {} of {} has no tensor `{name}`", self.manifest.step, self.store.url())
                })?;
                Ok((name.clone(), Slice::whole(&entry.shape)))
            })
            .collect::<Result<_>>()?;
        let buffers = self.store.read_many(self.manifest, &requests)?;
        for ((_, target), buffer) in targets.iter().zip(&buffers) {
            load_into(target, buffer)
                .with_context(|| format!("loading step {} from {}", self.manifest.step, self.store.url()))?;
        }
        Ok(())
    }
}

/// This rank's parts of tensors every rank holds the same copy of (weights, EMA, replicated
/// moments): the rows split evenly across the `world` ranks, so that together they write each
/// tensor once.
pub fn replicated_parts(named: Vec<(String, Tensor)>, rank: usize, world: usize) -> Result<Vec<LocalTensor>> {
    let mut out = Vec::with_capacity(named.len());
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
    let src = Tensor::from_data_size(&buffer.data, &dims, kind_of(buffer.dtype)).to_kind(target.kind());
    refuse_non_finite(&buffer.name, &src)?;
    tch::no_grad(|| target.shallow_clone().copy_(&src.to_device(target.device())));
    Ok(())
}

/// Refuses a floating-point tensor holding a NaN or an infinity (stored so, or out of range of
/// the kind it loads into), naming it: such weights would only fail much later, far from the
/// cause ("the distribution has no mass" in the sampler, a NaN loss in training).
fn refuse_non_finite(name: &str, t: &Tensor) -> Result<()> {
    if !t.is_floating_point() {
        return Ok(());
    }
    let bad = t.isfinite().logical_not();
    let count = bad.sum(Kind::Int64).int64_value(&[]);
    if count > 0 {
        let first = bad.reshape([-1]).nonzero().int64_value(&[0, 0]);
        let value = t.reshape([-1]).double_value(&[first]);
        bail!(
            "tensor `{name}` holds {count} value(s) that are not finite (the first, at flat index {first}, is {value}): \
             refusing to load it"
        );
    }
    Ok(())
}
