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

/// Which rows of every global batch a loader gives out: rank `rank` of `world` takes the
/// `global_batch / world` positions starting at `b·G + rank·G/world` of global batch `b`, in
/// micro-batches of `micro_batch` (the streaming reader's rule too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankSlice {
    pub rank: usize,
    pub world: usize,
    pub global_batch: usize,
    pub micro_batch: usize,
}

impl RankSlice {
    /// One process that takes whole batches of `micro_batch`.
    pub fn single(micro_batch: usize) -> Self {
        Self { rank: 0, world: 1, global_batch: micro_batch, micro_batch }
    }

    fn per_rank(&self) -> usize {
        self.global_batch / self.world
    }

    pub(crate) fn check(&self) -> Result<()> {
        ensure!(self.world > 0 && self.rank < self.world, "rank {} is not in a world of {}", self.rank, self.world);
        ensure!(
            self.global_batch > 0 && self.global_batch % self.world == 0,
            "global batch {} is not a positive multiple of the world size {}",
            self.global_batch,
            self.world
        );
        ensure!(
            self.micro_batch > 0 && self.per_rank() % self.micro_batch == 0,
            "micro-batch {} does not divide the {} sequences each rank takes of a global batch of {}",
            self.micro_batch,
            self.per_rank(),
            self.global_batch
        );
        Ok(())
    }
}

pub struct InMemoryLoader {
    sequences: Vec<u32>,
    seq_len: usize,
    slice: RankSlice,
    shuffle: bool,
    epoch: u64,
    /// Sequences this rank has taken in the current epoch.
    local: u64,
    seed: u64,
    order: Vec<u32>,
}

impl InMemoryLoader {
    /// `sequences` is a flat buffer of whole sequences. Without `shuffle` the order is the
    /// stored one (validation).
    pub fn new(sequences: Vec<u32>, seq_len: usize, micro_batch: usize, seed: u64, shuffle: bool) -> Result<Self> {
        Self::for_rank(sequences, seq_len, RankSlice::single(micro_batch), seed, shuffle)
    }

    /// A loader that gives out only `slice`'s rows of every global batch; the order, the
    /// batches and the state do not depend on the world size.
    pub fn for_rank(sequences: Vec<u32>, seq_len: usize, slice: RankSlice, seed: u64, shuffle: bool) -> Result<Self> {
        ensure!(seq_len > 0 && sequences.len() % seq_len == 0, "sequence buffer is not a whole number of sequences");
        slice.check()?;
        let n = sequences.len() / seq_len;
        ensure!(n >= slice.global_batch, "{n} sequences cannot fill a global batch of {}", slice.global_batch);
        let mut loader = Self { sequences, seq_len, slice, shuffle, epoch: 0, local: 0, seed, order: Vec::new() };
        loader.order = loader.epoch_order(0);
        Ok(loader)
    }

    pub fn num_sequences(&self) -> usize {
        self.sequences.len() / self.seq_len
    }

    /// This rank's sequences in one epoch (whole global batches only).
    fn local_per_epoch(&self) -> u64 {
        (self.num_sequences() / self.slice.global_batch * self.slice.per_rank()) as u64
    }

    /// (epoch, sequences consumed by all ranks together, seed): the same on every rank.
    pub fn state(&self) -> LoaderState {
        let (m, s) = (self.slice.per_rank() as u64, &self.slice);
        if self.local == self.local_per_epoch() {
            return LoaderState { epoch: self.epoch + 1, consumed: 0, seed: self.seed };
        }
        let consumed = self.local / m * s.global_batch as u64 + self.local % m * s.world as u64;
        LoaderState { epoch: self.epoch, consumed, seed: self.seed }
    }

    /// Continues from `state`, saved by a loader with the same global batch on any world size.
    pub fn restore(&mut self, state: LoaderState) -> Result<()> {
        let (g, s) = (self.slice.global_batch as u64, self.slice);
        let batches = (self.num_sequences() / s.global_batch) as u64;
        ensure!(
            state.consumed <= batches * g,
            "loader state consumed {} sequences of an epoch of {batches} global batches of {g}",
            state.consumed
        );
        let (b, rem) = (state.consumed / g, state.consumed % g);
        ensure!(
            rem % (s.world * s.micro_batch) as u64 == 0,
            "loader state is {rem} sequences into a global batch, which {} ranks with micro-batches of {} cannot continue",
            s.world,
            s.micro_batch
        );
        (self.epoch, self.seed) = (state.epoch, state.seed);
        self.local = b * s.per_rank() as u64 + rem / s.world as u64;
        self.order = self.epoch_order(state.epoch);
        Ok(())
    }

    pub fn next_batch(&mut self) -> Batch {
        if self.local == self.local_per_epoch() {
            self.epoch += 1;
            self.local = 0;
            self.order = self.epoch_order(self.epoch);
        }
        let (s, m) = (self.slice, self.slice.per_rank() as u64);
        let first = self.local / m * s.global_batch as u64 + (s.rank as u64) * m + self.local % m;
        let mut tokens = Vec::with_capacity(s.micro_batch * self.seq_len);
        for &seq in &self.order[first as usize..first as usize + s.micro_batch] {
            let at = seq as usize * self.seq_len;
            tokens.extend_from_slice(&self.sequences[at..at + self.seq_len]);
        }
        self.local += s.micro_batch as u64;
        Batch { tokens, micro_batch: s.micro_batch, seq_len: self.seq_len }
    }

    fn epoch_order(&self, epoch: u64) -> Vec<u32> {
        let mut order: Vec<u32> = (0..self.num_sequences() as u32).collect();
        if self.shuffle {
            shuffle(&mut order, self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
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
        assert_eq!(l.state(), LoaderState { epoch: 1, consumed: 0, seed: 7 });
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
        b.restore(a.state()).unwrap();
        for _ in 0..7 {
            assert_eq!(a.next_batch(), b.next_batch());
        }
    }

    /// Global batches of 6 from 20 sequences read by `world` ranks in lockstep (rank slices
    /// in rank order), `batches` of them after `state`.
    fn global_order(world: usize, micro: usize, batches: usize, state: Option<LoaderState>) -> (Vec<u32>, LoaderState) {
        let mut ranks: Vec<InMemoryLoader> = (0..world)
            .map(|rank| {
                let slice = RankSlice { rank, world, global_batch: 6, micro_batch: micro };
                InMemoryLoader::for_rank((0..40).collect(), 2, slice, 9, true).unwrap()
            })
            .collect();
        if let Some(state) = state {
            ranks.iter_mut().for_each(|l| l.restore(state).unwrap());
        }
        let mut order = Vec::new();
        for _ in 0..batches {
            for l in &mut ranks {
                for _ in 0..6 / world / micro {
                    order.extend(l.next_batch().tokens.into_iter().step_by(2));
                }
            }
        }
        let state = ranks[0].state();
        assert!(ranks.iter().all(|l| l.state() == state));
        (order, state)
    }

    #[test]
    fn ranks_take_their_slices_of_one_order_and_resume_on_any_world_size() {
        let (reference, state) = global_order(1, 6, 7, None);
        assert_eq!(state, LoaderState { epoch: 2, consumed: 6, seed: 9 }, "3 batches of 6 per epoch of 20");
        for (world, micro) in [(2, 1), (2, 3), (3, 2), (6, 1)] {
            assert_eq!(global_order(world, micro, 7, None).0, reference, "{world} ranks, micro-batch {micro}");
        }
        for (before, after) in [(2, 1), (1, 3), (3, 2)] {
            let (first, state) = global_order(before, 1, 4, None);
            let (rest, _) = global_order(after, 1, 3, Some(state));
            assert_eq!([first, rest].concat(), reference, "resumed from {before} ranks on {after}");
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
