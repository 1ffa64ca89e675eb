//! Weights in and out of checkpoints: export to one safetensors file with the published
//! checkpoints' key names, and import such a file as a committed checkpoint.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use checkpoint::safetensors::{Header, TensorView};
use checkpoint::{CheckpointMeta, CheckpointStore, LocalTensor, Manifest, Slice, TensorBuffer};
use tch::{nn, Device, Tensor};

use crate::config::{Config, DiffusionConfig};
use crate::stateful::{load_into, to_buffer};

/// Writes one safetensors file with the reference's key names (docs/algorithm.md §1.7): the EMA weights, or the
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
    let (bytes, header) = read_safetensors(file)?;
    let mut tensors = vec![];
    if let Some(cfg) = cfg {
        let mut vs = nn::VarStore::new(Device::Cpu);
        crate::model::Dit::build(&mut vs, &cfg.model)?;
        check_against_model(&name, &header, &vs, &OPTIONAL_BUFFERS)?;
        // What the file lacks comes from the model this config builds.
        for (key, t) in vs.variables() {
            if header.tensors.contains_key(&key) {
                continue;
            }
            fill_missing(&name, &key, &t, &cfg.diffusion);
            for prefix in ["model", "ema"] {
                tensors.push(LocalTensor::whole(to_buffer(&format!("{prefix}.{key}"), &t)?));
            }
        }
    }
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

/// The model buffers a weights file may lack: the clip interval, which backbone-only exports
/// leave out (the config's interval is used, with a warning), and the rotary frequencies, which
/// are a function of the head size.
pub const OPTIONAL_BUFFERS: [&str; 3] = ["sampling_eps_min", "sampling_eps_max", "backbone.rotary_emb.inv_freq"];

/// Loads a weights file into the model's variables. Only safetensors are read (never a pickle);
/// every tensor of the file must be a variable of the model with its shape, and every variable
/// must be in the file (but for [`OPTIONAL_BUFFERS`]): mismatches are listed by name.
pub fn load_weights(vs: &nn::VarStore, file: &Path, diffusion: &DiffusionConfig) -> Result<()> {
    let name = file.display().to_string();
    let (bytes, header) = read_safetensors(file)?;
    check_against_model(&name, &header, vs, &OPTIONAL_BUFFERS)?;
    for (key, target) in vs.variables() {
        let Some(entry) = header.tensors.get(&key) else {
            fill_missing(&name, &key, &target, diffusion);
            continue;
        };
        let range = header.byte_range(&key).expect("parsed entry");
        let data = bytes[range.start as usize..range.end as usize].to_vec();
        let buffer = TensorBuffer::new(key.clone(), entry.dtype, entry.shape.clone(), data)?;
        load_into(&target, &buffer).with_context(|| format!("loading {name}"))?;
    }
    Ok(())
}

/// A model variable that the weights file `file` lacks (one of [`OPTIONAL_BUFFERS`]): the clip
/// interval becomes the config's, with a warning; the rotary frequencies stay as the model
/// computed them.
fn fill_missing(file: &str, key: &str, target: &Tensor, diffusion: &DiffusionConfig) {
    let value = match key {
        "sampling_eps_min" => diffusion.sampling_eps_min,
        "sampling_eps_max" => diffusion.sampling_eps_max,
        _ => return,
    };
    tracing::warn!(file, tensor = key, value, "the weights lack this buffer: using the config's clip interval");
    let _ = tch::no_grad(|| target.shallow_clone().fill_(value));
}

/// The bytes and parsed header of a safetensors file; anything else (a pickle archive from
/// `torch.save`, say) is refused naming the file.
fn read_safetensors(file: &Path) -> Result<(Vec<u8>, Header)> {
    let name = file.display().to_string();
    let bytes = std::fs::read(file).with_context(|| format!("reading weights {name}"))?;
    let header = checkpoint::safetensors::parse(&bytes, &name).with_context(|| {
        format!("{name} is not a safetensors file: bd3 reads weights only as safetensors, never pickles")
    })?;
    Ok((bytes, header))
}

/// Checks a weights file's tensors against the model's variables: the same names (`optional`
/// ones may be missing) and shapes. Every mismatch is named.
fn check_against_model(name: &str, header: &Header, vs: &nn::VarStore, optional: &[&str]) -> Result<()> {
    let expected: BTreeMap<String, Vec<usize>> =
        vs.variables().into_iter().map(|(k, t)| (k, t.size().iter().map(|&d| d as usize).collect())).collect();
    let extra: Vec<&String> = header.tensors.keys().filter(|k| !expected.contains_key(*k)).collect();
    if !extra.is_empty() {
        bail!("{name}: tensors {extra:?} are not part of the model this config builds (tensor `{}`)", extra[0]);
    }
    let missing: Vec<&String> =
        expected.keys().filter(|k| !header.tensors.contains_key(*k) && !optional.contains(&k.as_str())).collect();
    if !missing.is_empty() {
        bail!("{name}: no tensor `{}` (the model needs it); missing: {missing:?}", missing[0]);
    }
    for (key, entry) in &header.tensors {
        let shape = &expected[key];
        ensure!(&entry.shape == shape, "{name}: tensor `{key}` has shape {:?}, the model needs {shape:?}", entry.shape);
    }
    Ok(())
}

static BINARY_COMMIT: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Records the git commit of the running binary (the launcher knows it) for manifests.
pub fn set_binary_commit(commit: &str) {
    let _ = BINARY_COMMIT.set(commit.to_string());
}

pub fn binary_commit() -> &'static str {
    BINARY_COMMIT.get().map_or("unknown", String::as_str)
}
