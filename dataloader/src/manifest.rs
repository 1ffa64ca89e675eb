//! `index.json`: what `bd3 prepare` wrote and what the reader checks its shards against.

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::store::StoreUrl;

pub const MANIFEST_NAME: &str = "index.json";
pub const FORMAT: &str = "bd3-tokens/1";
/// The one column of every shard: one row per token, sequences of `seq_len` consecutive rows.
pub const TOKEN_COLUMN: &str = "tokens";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    /// e.g. "gpt2 (tiktoken r50k_base)".
    pub tokenizer: String,
    /// Every token id is below this.
    pub vocab_size: u32,
    pub special_ids: SpecialIds,
    pub seq_len: usize,
    /// "wrap" (plain pieces of `seq_len`) or "bos_eos" (BOS, `seq_len - 2` tokens, EOS: docs/algorithm.md §7).
    pub framing: String,
    /// Sequences per row group; the last row group of a shard may hold fewer.
    pub row_group_sequences: usize,
    /// The command that wrote this data set.
    pub command: String,
    pub train: Split,
    pub valid: Split,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecialIds {
    pub bos: u32,
    pub eos: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Split {
    pub documents: u64,
    pub sequences: u64,
    pub tokens: u64,
    pub shards: Vec<ShardInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardInfo {
    /// Relative to the manifest's directory.
    pub path: String,
    pub sequences: u64,
    pub row_groups: usize,
    pub bytes: u64,
    /// SHA-256 of the whole file, hex.
    pub sha256: String,
    /// CRC-32 of each row group's token column chunk: the reader checks every ranged read.
    pub row_group_crc32: Vec<u32>,
}

impl Manifest {
    pub fn split(&self, which: SplitName) -> &Split {
        match which {
            SplitName::Train => &self.train,
            SplitName::Valid => &self.valid,
        }
    }

    /// Reads `index.json` under `dir` and checks that it is self-consistent.
    pub async fn load(dir: &StoreUrl) -> Result<Self> {
        let name = dir.display(MANIFEST_NAME);
        let bytes = dir.get(MANIFEST_NAME).await.with_context(|| format!("reading dataset manifest {name}"))?;
        let manifest: Manifest =
            serde_json::from_slice(&bytes).with_context(|| format!("parsing dataset manifest {name}"))?;
        manifest.check().with_context(|| format!("in dataset manifest {name}"))?;
        Ok(manifest)
    }

    /// [`Manifest::load`] of the data set at `url` (its directory or its `index.json`), blocking.
    pub fn load_url(url: &str) -> Result<Self> {
        let dir = crate::store::open(url.strip_suffix(MANIFEST_NAME).unwrap_or(url).trim_end_matches('/'))?;
        storage::block_on(Self::load(&dir))
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("a manifest always serializes");
        out.push(b'\n');
        out
    }

    fn check(&self) -> Result<()> {
        ensure!(self.format == FORMAT, "field `format`: expected \"{FORMAT}\", found \"{}\"", self.format);
        ensure!(self.seq_len > 0, "field `seq_len`: expected a positive length");
        ensure!(self.row_group_sequences > 0, "field `row_group_sequences`: expected a positive count");
        for (name, split) in [("train", &self.train), ("valid", &self.valid)] {
            let sum: u64 = split.shards.iter().map(|s| s.sequences).sum();
            ensure!(
                sum == split.sequences,
                "split `{name}`: its shards hold {sum} sequences but `sequences` says {}",
                split.sequences
            );
            ensure!(
                split.tokens == split.sequences * self.seq_len as u64,
                "split `{name}`: `tokens` is {}, expected sequences × seq_len = {}",
                split.tokens,
                split.sequences * self.seq_len as u64
            );
            for s in &split.shards {
                let expected = s.sequences.div_ceil(self.row_group_sequences as u64) as usize;
                ensure!(
                    s.row_groups == expected,
                    "shard {}: `row_groups` is {}, expected {expected} for {} sequences of {} per row group",
                    s.path,
                    s.row_groups,
                    s.sequences,
                    self.row_group_sequences
                );
                ensure!(
                    s.row_group_crc32.len() == s.row_groups,
                    "shard {}: {} row-group checksums for {} row groups",
                    s.path,
                    s.row_group_crc32.len(),
                    s.row_groups
                );
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SplitName {
    Train,
    Valid,
}

impl std::fmt::Display for SplitName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SplitName::Train => "train",
            SplitName::Valid => "valid",
        })
    }
}
