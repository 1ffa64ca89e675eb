//! Every kind of bad data set is an error that names the shard and what was expected.

use std::path::Path;

use super::*;
use crate::manifest::Manifest;
use crate::{Reader, ReaderConfig};

fn open(url: &str) -> anyhow::Result<Reader> {
    Reader::open(url, ReaderConfig { shuffle: false, ..ReaderConfig::new(0, 0, 1, 2, 1) })
}

/// Reads one whole epoch, returning the first error.
fn read_epoch(url: &str) -> anyhow::Result<()> {
    let mut r = open(url)?;
    for _ in 0..r.batches_per_epoch() * 2 {
        r.next_batch()?;
    }
    Ok(())
}

fn message(result: anyhow::Result<impl Sized>) -> String {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut Manifest)) {
    let path = dir.join("index.json");
    let mut m: Manifest = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut m);
    std::fs::write(path, m.to_json()).unwrap();
}

/// Replaces shard 1 with `tokens` encoded as given, and updates the manifest to match it, so
/// that only the content is wrong.
fn replace_shard(dir: &Path, tokens: &[u32], seq_len: usize) {
    let (bytes, info) = crate::shard::encode_with_info(tokens, seq_len, 3, "train-00001.parquet").unwrap();
    std::fs::write(dir.join("train-00001.parquet"), bytes).unwrap();
    edit_manifest(dir, |m| {
        let s = &mut m.train.shards[1];
        let sequences = s.sequences;
        *s = info;
        s.sequences = sequences; // what the manifest believes
    });
}

const SHARD: &str = "train-00001.parquet";

#[test]
fn truncated_shard() {
    let (dir, url) = local_dataset(20, 0);
    let path = dir.path().join(SHARD);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let msg = message(open(&url));
    assert!(msg.contains(SHARD) && msg.contains(&format!("the manifest says {}", bytes.len())), "{msg}");
    // Even with a manifest that agrees on the size, the footer is gone.
    edit_manifest(dir.path(), |m| m.train.shards[1].bytes = (bytes.len() / 2) as u64);
    let msg = message(open(&url));
    assert!(msg.contains(SHARD) && msg.contains("not a Parquet file"), "{msg}");
}

#[test]
fn corrupt_row_group() {
    let (dir, url) = local_dataset(20, 0);
    let path = dir.path().join(SHARD);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[10] ^= 0xff; // inside the first row group's data, not the footer
    std::fs::write(&path, &bytes).unwrap();
    let msg = message(read_epoch(&url));
    assert!(msg.contains(SHARD) && msg.contains("row group 0") && msg.contains("corrupt"), "{msg}");
    crate::prepare::verify(&url, vec![]).map(|_| ()).expect_err("the checksum differs");
    let msg = message(crate::prepare::verify(&url, vec![]));
    assert!(msg.contains(SHARD) && msg.contains("SHA-256"), "{msg}");
}

#[test]
fn corrupt_footer() {
    let (dir, url) = local_dataset(20, 0);
    let path = dir.path().join(SHARD);
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 8..n - 4].copy_from_slice(&0x00ff_0000u32.to_le_bytes()); // footer length
    std::fs::write(&path, &bytes).unwrap();
    let msg = message(open(&url));
    assert!(msg.contains(SHARD) && msg.contains("footer"), "{msg}");
}

#[test]
fn wrong_schema() {
    let (dir, url) = local_dataset(20, 0);
    let schema = std::sync::Arc::new(arrow_schema::Schema::new(vec![arrow_schema::Field::new(
        "ids",
        arrow_schema::DataType::Int64,
        false,
    )]));
    let mut w = parquet::arrow::ArrowWriter::try_new(Vec::new(), schema.clone(), None).unwrap();
    let column = std::sync::Arc::new(arrow_array::Int64Array::from((0..28).collect::<Vec<i64>>()));
    w.write(&arrow_array::RecordBatch::try_new(schema, vec![column]).unwrap()).unwrap();
    let bytes = w.into_inner().unwrap();
    std::fs::write(dir.path().join(SHARD), &bytes).unwrap();
    edit_manifest(dir.path(), |m| m.train.shards[1].bytes = bytes.len() as u64);
    let msg = message(open(&url));
    assert!(msg.contains(SHARD) && msg.contains("expected one column `tokens` of uint32, found [ids: Int64]"), "{msg}");
}

#[test]
fn token_id_beyond_the_vocabulary() {
    let (dir, url) = local_dataset(20, 0);
    let mut tokens = numbered(7, 4);
    tokens[13] = 50257; // the vocabulary of the test manifest is 50257
    replace_shard(dir.path(), &tokens, 4);
    let msg = message(read_epoch(&url));
    assert!(msg.contains(SHARD) && msg.contains("token id 50257 is not below the vocabulary size 50257"), "{msg}");
    assert!(msg.contains("row group 1, row 1"), "{msg}");
}

#[test]
fn wrong_sequence_length() {
    let (dir, url) = local_dataset(20, 0);
    // Seven sequences of 5 tokens where the manifest says 4.
    replace_shard(dir.path(), &numbered(7, 5), 5);
    let msg = message(open(&url));
    assert!(msg.contains(SHARD) && msg.contains("row group 0 has 15 rows, expected 12"), "{msg}");
}

#[test]
fn empty_shard() {
    let (dir, url) = local_dataset(20, 0);
    replace_shard(dir.path(), &[], 4);
    // A manifest that agrees that the shard is empty.
    edit_manifest(dir.path(), |m| {
        m.train.sequences -= m.train.shards[1].sequences;
        m.train.tokens = m.train.sequences * 4;
        let s = &mut m.train.shards[1];
        (s.sequences, s.row_groups) = (0, 0);
    });
    let msg = message(open(&url));
    assert!(msg.contains(SHARD) && msg.contains("is empty"), "{msg}");
}

#[test]
fn manifest_that_does_not_match_its_shards() {
    let (dir, url) = local_dataset(20, 0);
    // Shard 1 holds 7 sequences; say 8, keeping the manifest self-consistent.
    edit_manifest(dir.path(), |m| {
        m.train.shards[1].sequences = 8;
        m.train.sequences += 1;
        m.train.tokens += 4;
    });
    let msg = message(open(&url));
    assert!(msg.contains(SHARD) && msg.contains("holds 7 sequences of 4 tokens, the manifest says 8"), "{msg}");
    // A missing shard.
    let (dir, url) = local_dataset(20, 0);
    std::fs::remove_file(dir.path().join(SHARD)).unwrap();
    let msg = message(open(&url));
    assert!(msg.contains(SHARD), "{msg}");
    // A manifest whose totals disagree with its own shard list.
    edit_manifest(dir.path(), |m| m.train.sequences += 1);
    let msg = message(open(&url));
    assert!(
        msg.contains("index.json") && msg.contains("its shards hold 20 sequences but `sequences` says 21"),
        "{msg}"
    );
}
