//! What a committed checkpoint contains, and what each rank reports about its own part.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};

use crate::slice::Slice;
use crate::DType;

/// Bumped when the layout changes incompatibly; readers refuse versions they do not know.
pub const FORMAT_VERSION: u32 = 1;
/// Written into every manifest: retention deletes only checkpoints that carry it.
pub const WRITER: &str = "bd3";

/// Run-level facts rank 0 writes into the manifest.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub tokens_seen: u64,
    /// The full resolved configuration.
    pub config: serde_json::Value,
    /// A hash of the configuration's canonical JSON, to spot a changed config at a glance.
    pub config_hash: String,
    /// The commit of the binary that wrote the checkpoint.
    pub git_commit: String,
    /// Small non-tensor state by component: data-loader position, RNG, clip interval, LR schedule,
    /// optimizer and EMA step counters.
    pub state: BTreeMap<String, serde_json::Value>,
}

/// One stored piece of a tensor: the box it covers and the file that holds it (under the
/// tensor's own name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    pub file: String,
    #[serde(flatten)]
    pub slice: Slice,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub dtype: DType,
    /// The global shape.
    pub shape: Vec<usize>,
    pub pieces: Vec<Piece>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub rank: usize,
    pub bytes: u64,
    /// CRC-32C (Castagnoli) of the whole file.
    pub crc32c: u32,
}

/// `manifest.json` of one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub writer: String,
    pub step: u64,
    pub world_size: usize,
    pub tensors: BTreeMap<String, TensorEntry>,
    pub files: BTreeMap<String, FileEntry>,
    #[serde(flatten)]
    pub meta: CheckpointMeta,
}

/// `rank-NNNNN.json`: what one rank wrote, read back by rank 0 to build the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankIndex {
    pub step: u64,
    pub rank: usize,
    pub world_size: usize,
    /// The job that wrote it ([`crate::WriteOptions::attempt`]).
    #[serde(default)]
    pub attempt: u64,
    pub tensors: BTreeMap<String, TensorEntry>,
    pub files: BTreeMap<String, FileEntry>,
}

impl Manifest {
    /// Merges every rank's index and checks that the pieces of each tensor tile its global
    /// shape exactly once.
    pub fn merge(step: u64, world_size: usize, ranks: Vec<RankIndex>, meta: CheckpointMeta) -> Result<Self> {
        let mut tensors: BTreeMap<String, TensorEntry> = BTreeMap::new();
        let mut files = BTreeMap::new();
        for index in ranks {
            ensure!(
                index.step == step && index.world_size == world_size,
                "rank {} wrote step {} of world {}, expected step {step} of world {world_size}",
                index.rank,
                index.step,
                index.world_size
            );
            files.extend(index.files);
            for (name, entry) in index.tensors {
                match tensors.get_mut(&name) {
                    None => {
                        tensors.insert(name, entry);
                    }
                    Some(have) if have.dtype == entry.dtype && have.shape == entry.shape => {
                        have.pieces.extend(entry.pieces)
                    }
                    Some(have) => bail!(
                        "tensor `{name}`: rank {} holds {:?}{:?}, another rank {:?}{:?}",
                        index.rank,
                        entry.dtype,
                        entry.shape,
                        have.dtype,
                        have.shape
                    ),
                }
            }
        }
        for (name, entry) in &tensors {
            check_tiling(name, entry)?;
        }
        Ok(Self { format_version: FORMAT_VERSION, writer: WRITER.into(), step, world_size, tensors, files, meta })
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.values().map(|f| f.bytes).sum()
    }
}

/// The pieces lie inside the tensor, do not overlap, and cover every element.
pub fn check_tiling(name: &str, entry: &TensorEntry) -> Result<()> {
    let numel: usize = entry.shape.iter().product();
    let mut covered = 0;
    for (i, p) in entry.pieces.iter().enumerate() {
        ensure!(
            p.slice.fits(&entry.shape),
            "tensor `{name}`: piece {:?} lies outside shape {:?}",
            p.slice,
            entry.shape
        );
        for q in &entry.pieces[..i] {
            ensure!(
                p.slice.intersect(&q.slice).is_none(),
                "tensor `{name}`: pieces in {} and {} overlap",
                p.file,
                q.file
            );
        }
        covered += p.slice.numel();
    }
    ensure!(covered == numel, "tensor `{name}`: pieces cover {covered} of {numel} elements");
    Ok(())
}
