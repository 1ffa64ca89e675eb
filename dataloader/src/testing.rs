//! Test support: bd3-storage's S3 test server and temporary directories (re-exported so that
//! `dataloader::testing::…` keeps working), and a writer of exact token data sets.

pub use storage::testing::*;

/// Writes a data set of already tokenized sequences (flat buffers of whole `seq_len` sequences)
/// as `bd3 prepare` would, for tests that need exact control over the tokens.
pub fn write_token_dataset(
    url: &str,
    options: Vec<(String, String)>,
    seq_len: usize,
    splits: [&[u32]; 2],
    shard_sequences: usize,
    row_group_sequences: usize,
) -> anyhow::Result<crate::Manifest> {
    use crate::manifest::{Manifest, Split, TokenizerSpecialIds, FORMAT, MANIFEST_NAME};

    let dir = crate::store::open_with_options(url, options)?;
    let mut written = Vec::new();
    for (tokens, prefix) in splits.into_iter().zip(["train", "valid"]) {
        let mut split = Split::default();
        for (i, shard) in tokens.chunks(shard_sequences * seq_len).enumerate() {
            let path = format!("{prefix}-{i:05}.parquet");
            let (bytes, info) = crate::shard::encode_with_info(shard, seq_len, row_group_sequences, &path)?;
            let sequences = info.sequences;
            storage::block_on(dir.put(&path, vec![bytes.into()]))?;
            split.shards.push(info);
            split.sequences += sequences;
        }
        split.tokens = split.sequences * seq_len as u64;
        written.push(split);
    }
    let [train, valid]: [Split; 2] = written.try_into().map_err(|_| anyhow::anyhow!("two splits"))?;
    let manifest = Manifest {
        format: FORMAT.to_string(),
        tokenizer: "test".to_string(),
        vocab_size: crate::tokenizer::MODEL_VOCAB as u32 - 1,
        special_ids: TokenizerSpecialIds::gpt2(),
        seq_len,
        framing: "wrap".to_string(),
        row_group_sequences,
        command: "write_token_dataset".to_string(),
        tokenizer_file: None,
        train,
        valid,
    };
    storage::block_on(dir.put(MANIFEST_NAME, vec![manifest.to_json().into()]))?;
    Ok(manifest)
}
