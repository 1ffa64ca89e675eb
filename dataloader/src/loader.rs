//! Deterministic in-memory batches over packed sequences.
//!
//! One global order per epoch, a permutation of the sequences drawn from (seed, epoch); the
//! state is only (epoch, sequences consumed, seed), so resuming needs no buffered data.

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

/// What a checkpoint stores to resume the reader exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    pub epoch: u64,
    /// Sequences consumed in the current epoch.
    pub consumed: u64,
    pub seed: u64,
}

/// `micro_batch` sequences of `seq_len` tokens, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub micro_batch: usize,
    pub seq_len: usize,
}

pub struct InMemoryLoader {
    sequences: Vec<u32>,
    seq_len: usize,
    micro_batch: usize,
    shuffle: bool,
    state: LoaderState,
    order: Vec<u32>,
}

impl InMemoryLoader {
    /// `sequences` is a flat buffer of whole sequences. Without `shuffle` the order is the
    /// stored one (validation).
    pub fn new(sequences: Vec<u32>, seq_len: usize, micro_batch: usize, seed: u64, shuffle: bool) -> Result<Self> {
        ensure!(seq_len > 0 && sequences.len() % seq_len == 0, "sequence buffer is not a whole number of sequences");
        let n = sequences.len() / seq_len;
        ensure!(micro_batch > 0 && n >= micro_batch, "{n} sequences cannot fill a micro-batch of {micro_batch}");
        let mut loader = Self {
            sequences,
            seq_len,
            micro_batch,
            shuffle,
            state: LoaderState { epoch: 0, consumed: 0, seed },
            order: Vec::new(),
        };
        loader.order = loader.epoch_order(0);
        Ok(loader)
    }

    pub fn num_sequences(&self) -> usize {
        self.sequences.len() / self.seq_len
    }

    pub fn state(&self) -> LoaderState {
        self.state
    }

    pub fn restore(&mut self, state: LoaderState) {
        self.state = state;
        self.order = self.epoch_order(state.epoch);
    }

    pub fn next_batch(&mut self) -> Batch {
        if self.state.consumed as usize + self.micro_batch > self.num_sequences() {
            self.state.epoch += 1;
            self.state.consumed = 0;
            self.order = self.epoch_order(self.state.epoch);
        }
        let start = self.state.consumed as usize;
        let mut tokens = Vec::with_capacity(self.micro_batch * self.seq_len);
        for &seq in &self.order[start..start + self.micro_batch] {
            let s = seq as usize * self.seq_len;
            tokens.extend_from_slice(&self.sequences[s..s + self.seq_len]);
        }
        self.state.consumed += self.micro_batch as u64;
        Batch { tokens, micro_batch: self.micro_batch, seq_len: self.seq_len }
    }

    fn epoch_order(&self, epoch: u64) -> Vec<u32> {
        let mut order: Vec<u32> = (0..self.num_sequences() as u32).collect();
        if self.shuffle {
            shuffle(&mut order, self.state.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        }
        order
    }
}

/// Fisher–Yates with `SplitMix64(seed)`: the same permutation on every machine and version.
pub(crate) fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut rng = SplitMix64(seed);
    for i in (1..items.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// Small, portable PRNG: the order must not depend on a crate's version.
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loader(shuffle: bool) -> InMemoryLoader {
        // 10 sequences of 2 tokens: sequence i is [2i, 2i+1].
        InMemoryLoader::new((0..20).collect(), 2, 3, 7, shuffle).unwrap()
    }

    #[test]
    fn every_sequence_once_per_epoch() {
        let mut l = loader(true);
        let mut seen: Vec<u32> = (0..3).flat_map(|_| l.next_batch().tokens).step_by(2).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 9, "9 distinct sequences in the 3 full batches of epoch 0");
        let next = l.next_batch();
        assert_eq!(l.state(), LoaderState { epoch: 1, consumed: 3, seed: 7 });
        assert_eq!(next.tokens.len(), 6);
    }

    #[test]
    fn restore_continues_the_same_order() {
        let mut a = loader(true);
        for _ in 0..5 {
            a.next_batch();
        }
        let mut b = loader(true);
        b.restore(a.state());
        for _ in 0..7 {
            assert_eq!(a.next_batch(), b.next_batch());
        }
    }

    #[test]
    fn unshuffled_order_is_the_stored_order() {
        let mut l = loader(false);
        assert_eq!(l.next_batch().tokens, vec![0, 1, 2, 3, 4, 5]);
        assert!(InMemoryLoader::new(vec![1, 2, 3], 2, 1, 0, false).is_err());
        assert!(InMemoryLoader::new(vec![1, 2], 2, 2, 0, false).is_err());
    }
}
