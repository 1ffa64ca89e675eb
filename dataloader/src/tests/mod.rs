//! Tests of the object-store data path: prepare, shards, the streaming reader.

mod bad_input;
mod prepare;
mod reader;

use crate::testing::{temp_dir, write_token_dataset, TempDir};

/// `n` sequences of `seq_len` tokens; sequence `i` starts with `i` (its identity) and is
/// otherwise distinct from its neighbours.
fn numbered(n: usize, seq_len: usize) -> Vec<u32> {
    (0..n)
        .flat_map(|i| (0..seq_len).map(move |j| if j == 0 { i as u32 } else { ((i * 7 + j * 13) % 50000) as u32 }))
        .collect()
}

/// The identities (first tokens) of a batch's sequences.
fn ids(tokens: &[u32], seq_len: usize) -> Vec<u32> {
    tokens.chunks(seq_len).map(|s| s[0]).collect()
}

/// A local data set of `n` train and `v` valid numbered sequences of 4 tokens, in shards of 7
/// sequences (the last one shorter) and row groups of 3.
fn local_dataset(n: usize, v: usize) -> (TempDir, String) {
    let dir = temp_dir("reader").unwrap();
    let url = dir.path().to_str().unwrap().to_string();
    let valid: Vec<u32> = numbered(n + v, 4).split_off(n * 4);
    write_token_dataset(&url, vec![], 4, [&numbered(n, 4), &valid], 7, 3).unwrap();
    (dir, url)
}
