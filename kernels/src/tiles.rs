//! Analytic description of a [`BlockLayout`]'s mask: which keys a query may see, and for a
//! rectangle of (query, key) positions — a tile — whether it is empty, full or partial.
//!
//! Every layout is a grid of *quadrants* (one for single-stream layouts, four for x_t ⊕ x_0).
//! Inside a quadrant, visibility depends only on the block indices of the query and the key
//! (counted from the quadrant's own origin), through one [`Rule`]. A tile therefore classifies in
//! O(number of quadrants) from the block ranges it spans, without looking at its elements; the fast
//! paths never build the 2L × 2L mask, and evaluate [`BlockLayout::visible`] only inside partial
//! tiles. The CUDA kernels implement the same rules in `csrc/layout.cuh`; a test checks that both
//! agree.

use std::ops::Range;

use crate::BlockLayout;

/// What a tile of the mask contains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TileKind {
    /// No query of the tile sees any key of it: skipped entirely.
    Empty,
    /// Every query sees every key: computed without any mask.
    Full,
    /// Some pairs are visible: the element mask ([`BlockLayout::visible`]) applies.
    Partial,
}

/// How block indices decide visibility inside one quadrant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    Never,
    Always,
    /// Same block only (block-diagonal: noisy ↔ noisy).
    SameBlock,
    /// Strictly earlier key blocks (noisy queries → clean keys).
    EarlierBlock,
    /// Same or earlier key blocks (block-causal; causal with blocks of 1).
    SameOrEarlierBlock,
}

impl Rule {
    /// Visibility for a query block `bq` and key block `bk`.
    pub fn allows(self, bq: usize, bk: usize) -> bool {
        match self {
            Rule::Never => false,
            Rule::Always => true,
            Rule::SameBlock => bq == bk,
            Rule::EarlierBlock => bk < bq,
            Rule::SameOrEarlierBlock => bk <= bq,
        }
    }

    /// Classification of the query blocks `qa..=qb` against the key blocks `ka..=kb`.
    fn classify(self, (qa, qb): (usize, usize), (ka, kb): (usize, usize)) -> TileKind {
        let (full, empty) = match self {
            Rule::Never => (false, true),
            Rule::Always => (true, false),
            Rule::SameBlock => (qa == qb && ka == kb && qa == ka, kb < qa || ka > qb),
            Rule::EarlierBlock => (kb < qa, ka >= qb),
            Rule::SameOrEarlierBlock => (kb <= qa, ka > qb),
        };
        match (full, empty) {
            (true, _) => TileKind::Full,
            (_, true) => TileKind::Empty,
            _ => TileKind::Partial,
        }
    }
}

/// One rectangle of the mask governed by a single [`Rule`]; block indices count from its origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quadrant {
    pub queries: Range<usize>,
    pub keys: Range<usize>,
    pub rule: Rule,
    pub block_size: usize,
}

impl Quadrant {
    fn blocks(&self, r: &Range<usize>, origin: usize) -> (usize, usize) {
        ((r.start - origin) / self.block_size, (r.end - 1 - origin) / self.block_size)
    }
}

/// [`BlockLayout::visible`] against precomputed quadrants (for loops over many elements).
pub fn visible_in(quadrants: &[Quadrant], q: usize, k: usize) -> bool {
    quadrants.iter().any(|quad| {
        quad.queries.contains(&q)
            && quad.keys.contains(&k)
            && quad.rule.allows((q - quad.queries.start) / quad.block_size, (k - quad.keys.start) / quad.block_size)
    })
}

fn intersect(a: &Range<usize>, b: &Range<usize>) -> Option<Range<usize>> {
    let r = a.start.max(b.start)..a.end.min(b.end);
    (r.start < r.end).then_some(r)
}

impl BlockLayout {
    /// The quadrants that tile the `[query_len, key_len]` mask.
    pub fn quadrants(&self) -> Vec<Quadrant> {
        let quadrant = |queries, keys, rule, block_size| Quadrant { queries, keys, rule, block_size };
        match *self {
            Self::TwoStream { seq_len: n, block_size: b } => vec![
                quadrant(0..n, 0..n, Rule::SameBlock, b),
                quadrant(0..n, n..2 * n, Rule::EarlierBlock, b),
                quadrant(n..2 * n, 0..n, Rule::Never, b),
                quadrant(n..2 * n, n..2 * n, Rule::SameOrEarlierBlock, b),
            ],
            Self::BlockCausal { seq_len: n, block_size: b } => vec![quadrant(0..n, 0..n, Rule::SameOrEarlierBlock, b)],
            Self::Causal { seq_len: n } => vec![quadrant(0..n, 0..n, Rule::SameOrEarlierBlock, 1)],
            Self::Decode { .. } => vec![quadrant(0..self.query_len(), 0..self.key_len(), Rule::Always, 1)],
        }
    }

    /// Boundaries of the query streams (x_t and x_0 for the two-stream layout): query tiles
    /// never straddle them, so every tile of a stream starts at a block boundary.
    pub fn query_streams(&self) -> Vec<Range<usize>> {
        self.streams(|quad| quad.queries)
    }

    /// Boundaries of the key streams, as [`Self::query_streams`] for keys.
    pub fn key_streams(&self) -> Vec<Range<usize>> {
        self.streams(|quad| quad.keys)
    }

    fn streams(&self, side: fn(Quadrant) -> Range<usize>) -> Vec<Range<usize>> {
        let mut streams: Vec<Range<usize>> = self.quadrants().into_iter().map(side).collect();
        streams.sort_by_key(|r| r.start);
        streams.dedup();
        streams
    }

    /// Whether query `q` may attend to key `k` (both in range; out-of-range pairs are hidden).
    pub fn visible(&self, q: usize, k: usize) -> bool {
        visible_in(&self.quadrants(), q, k)
    }

    /// The (query, key) pairs the mask lets attend: what attention costs in model FLOPs
    /// (4·d per pair, forward). Counted per query block, so it is cheap for any length.
    pub fn visible_pairs(&self) -> u64 {
        let mut pairs = 0u64;
        for quad in self.quadrants() {
            let b = quad.block_size;
            let key_blocks = quad.keys.len().div_ceil(b);
            for bq in 0..quad.queries.len().div_ceil(b) {
                let keys = match quad.rule {
                    Rule::Never => 0,
                    Rule::Always => key_blocks,
                    Rule::SameBlock => usize::from(bq < key_blocks),
                    Rule::EarlierBlock => bq.min(key_blocks),
                    Rule::SameOrEarlierBlock => (bq + 1).min(key_blocks),
                };
                // Every stream length is a multiple of its block size (two_stream, block_causal).
                pairs += (b * b * keys) as u64;
            }
        }
        pairs
    }

    /// Classifies the tile `queries × keys` (non-empty ranges inside the layout) from the block
    /// ranges it spans in each quadrant.
    pub fn classify(&self, queries: Range<usize>, keys: Range<usize>) -> TileKind {
        let (mut any_full, mut any_empty, mut any_partial) = (false, false, false);
        for quad in self.quadrants() {
            let (Some(qr), Some(kr)) = (intersect(&queries, &quad.queries), intersect(&keys, &quad.keys)) else {
                continue;
            };
            let kind = quad.rule.classify(quad.blocks(&qr, quad.queries.start), quad.blocks(&kr, quad.keys.start));
            match kind {
                TileKind::Full => any_full = true,
                TileKind::Empty => any_empty = true,
                TileKind::Partial => any_partial = true,
            }
        }
        match (any_partial, any_full, any_empty) {
            (false, true, false) => TileKind::Full,
            (false, false, _) => TileKind::Empty,
            _ => TileKind::Partial,
        }
    }

    /// Splits `streams` into consecutive tiles of at most `tile` positions, each aligned at its
    /// stream's start.
    pub fn tiles_of(streams: &[Range<usize>], tile: usize) -> Vec<Range<usize>> {
        let tile = tile.max(1);
        streams.iter().flat_map(|s| (s.start..s.end).step_by(tile).map(move |a| a..(a + tile).min(s.end))).collect()
    }

    /// The key tiles a query tile needs: the index in `key_tiles` and kind of every non-empty one.
    pub fn visible_tiles(&self, queries: &Range<usize>, key_tiles: &[Range<usize>]) -> Vec<(usize, TileKind)> {
        key_tiles
            .iter()
            .enumerate()
            .map(|(i, keys)| (i, self.classify(queries.clone(), keys.clone())))
            .filter(|(_, kind)| *kind != TileKind::Empty)
            .collect()
    }
}
