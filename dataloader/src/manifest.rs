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
    pub special_ids: TokenizerSpecialIds,
    pub seq_len: usize,
    /// "wrap" (plain pieces of `seq_len`) or "bos_eos" (BOS, `seq_len - 2` tokens, EOS: docs/algorithm.md §7).
    pub framing: String,
    /// Sequences per row group; the last row group of a shard may hold fewer.
    pub row_group_sequences: usize,
    /// The command that wrote this data set.
    pub command: String,
    /// The `tokenizer.json` the data set was tokenized with (`bd3 prepare --tokenizer`), copied
    /// beside this file (relative path); absent for GPT-2 BPE. Sampling decodes with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_file: Option<String>,
    pub train: Split,
    pub valid: Split,
}

/// The BOS and EOS ids a run uses (trainer::data::special_ids).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecialIds {
    pub bos: u32,
    pub eos: u32,
}

/// `special_ids` of `index.json`: the tokenizer's BOS and EOS (GPT-2: both `<|endoftext|>`;
/// BERT: `[CLS]` and `[SEP]`), and its mask and padding tokens where it has them (BERT: `[MASK]`,
/// `[PAD]`; GPT-2 has neither, and data sets written before these fields existed lack them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerSpecialIds {
    pub bos: u32,
    pub eos: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad: Option<u32>,
}

impl TokenizerSpecialIds {
    /// GPT-2's: `<|endoftext|>` as BOS and EOS, no mask or padding token.
    pub fn gpt2() -> Self {
        let eos = crate::tokenizer::EOS_ID;
        Self { bos: eos, eos, mask: None, pad: None }
    }

    /// Each recorded id with its name, for range checks.
    pub fn named(&self) -> Vec<(&'static str, u32)> {
        let mut ids = vec![("BOS", self.bos), ("EOS", self.eos)];
        ids.extend(self.mask.map(|id| ("mask", id)));
        ids.extend(self.pad.map(|id| ("padding", id)));
        ids
    }
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
        for (name, id) in self.special_ids.named() {
            ensure!(
                id < self.vocab_size,
                "field `special_ids`: the {name} id {id} is not below `vocab_size` ({})",
                self.vocab_size
            );
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// index.json files written before `mask`, `pad` and `tokenizer_file` existed still load, and
    /// GPT-2 data sets are still written without them.
    #[test]
    fn old_index_files_load_and_new_fields_round_trip() {
        let old = r#"{"format": "bd3-tokens/1", "tokenizer": "gpt2 (tiktoken r50k_base)", "vocab_size": 50257,
            "special_ids": {"bos": 50256, "eos": 50256}, "seq_len": 8, "framing": "wrap",
            "row_group_sequences": 4, "command": "bd3 prepare",
            "train": {"documents": 0, "sequences": 0, "tokens": 0, "shards": []},
            "valid": {"documents": 0, "sequences": 0, "tokens": 0, "shards": []}}"#;
        let manifest: Manifest = serde_json::from_str(old).unwrap();
        manifest.check().unwrap();
        assert_eq!(manifest.special_ids, TokenizerSpecialIds::gpt2());
        assert_eq!(manifest.tokenizer_file, None);
        let written = String::from_utf8(manifest.to_json()).unwrap();
        assert!(!written.contains("mask") && !written.contains("tokenizer_file"), "{written}");

        let mut bert = manifest.clone();
        bert.vocab_size = 30522;
        bert.special_ids = TokenizerSpecialIds { bos: 101, eos: 102, mask: Some(103), pad: Some(0) };
        bert.tokenizer_file = Some("tokenizer.json".into());
        let back: Manifest = serde_json::from_slice(&bert.to_json()).unwrap();
        assert_eq!(back, bert);
        // A special id outside the vocabulary is refused, naming it.
        bert.special_ids.mask = Some(40000);
        let err = bert.check().unwrap_err().to_string();
        assert!(err.contains("mask id 40000") && err.contains("30522"), "{err}");
    }
}
