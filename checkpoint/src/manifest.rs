//! What a committed checkpoint contains, and what each rank reports about its own part.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::slice::Slice;
use crate::DType;

/// Bumped when the layout changes incompatibly; readers refuse versions they do not know.
pub const FORMAT_VERSION: u32 = 1;
/// Written into every manifest: retention deletes only checkpoints that carry it.
pub const WRITER: &str = "bd3";

/// `step-NNNNNNNNNN`: the directory of one step.
pub fn step_dir(step: u64) -> String {
    format!("step-{step:010}")
}

/// `rank-NNNNN-PPP.safetensors`: part `part` of what rank `rank` holds.
pub fn rank_file(rank: usize, part: usize) -> String {
    format!("rank-{rank:05}-{part:03}.safetensors")
}

/// `rank-NNNNN.json`: rank `rank`'s index.
pub fn rank_index(rank: usize) -> String {
    format!("rank-{rank:05}.json")
}

/// `(rank, part)` of a tensor file name exactly as [`rank_file`] spells it; `None` for anything
/// else (other names, paths, `..`, leading zeros that were not ours).
pub fn parse_rank_file(name: &str) -> Option<(usize, usize)> {
    let (rank, part) = name.strip_prefix("rank-")?.strip_suffix(".safetensors")?.split_once('-')?;
    let parsed = (parse_digits(rank)?, parse_digits(part)?);
    (rank_file(parsed.0, parsed.1) == name).then_some(parsed)
}

/// The rank of an index name exactly as [`rank_index`] spells it.
pub fn parse_rank_index(name: &str) -> Option<usize> {
    let rank = parse_digits(name.strip_prefix("rank-")?.strip_suffix(".json")?)?;
    (rank_index(rank) == name).then_some(rank)
}

fn parse_digits(s: &str) -> Option<usize> {
    s.bytes().all(|b| b.is_ascii_digit()).then(|| s.parse().ok()).flatten()
}

/// Checks every file name a manifest or rank index lists, before anything opens, verifies or
/// deletes such a file: each must be a tensor file name this crate writes (one path component,
/// `rank-NNNNN-PPP.safetensors`) of a rank that exists (`only_rank`: the index's own), and every
/// tensor piece must name a listed file. `source` (the JSON file's URL) leads the error.
fn check_file_names(
    source: &str,
    world_size: usize,
    files: &BTreeMap<String, FileEntry>,
    tensors: &BTreeMap<String, TensorEntry>,
    only_rank: Option<usize>,
) -> Result<()> {
    for (name, entry) in files {
        let (rank, _) = parse_rank_file(name).with_context(|| {
            format!(
                "{source}: field `files`: `{name}` is not a checkpoint file name (expected rank-NNNNN-PPP.safetensors)"
            )
        })?;
        ensure!(
            rank == entry.rank && rank < world_size && only_rank.is_none_or(|r| r == rank),
            "{source}: field `files`: `{name}` is a file of rank {rank}, but its entry says rank {} (world size {world_size}{})",
            entry.rank,
            only_rank.map_or(String::new(), |r| format!(", index of rank {r}"))
        );
    }
    for (tensor, entry) in tensors {
        for piece in &entry.pieces {
            ensure!(
                files.contains_key(&piece.file),
                "{source}: field `tensors.{tensor}.pieces`: file `{}` is not one of the listed `files`",
                piece.file
            );
        }
    }
    Ok(())
}

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

    /// Refuses a manifest naming any file outside the step directory or not of this crate's
    /// naming scheme; `source` is the manifest's URL, for the error.
    pub fn check_file_names(&self, source: &str) -> Result<()> {
        check_file_names(source, self.world_size, &self.files, &self.tensors, None)
    }
}

impl RankIndex {
    /// As [`Manifest::check_file_names`], and every file must be this rank's own.
    pub fn check_file_names(&self, source: &str) -> Result<()> {
        check_file_names(source, self.world_size, &self.files, &self.tensors, Some(self.rank))
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
