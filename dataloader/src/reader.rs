//! The streaming reader: each rank's slice of every global batch, from one global order.
//!
//! The order of an epoch depends only on (manifest, seed, epoch, shuffle window, global batch):
//! shards are permuted, then the row groups inside each shard, and the sequences of every window
//! of `shuffle_window` consecutive row groups are permuted among themselves ([`window_order`]).
//! Global batch `b` is positions `[b·G, (b+1)·G)` of that order; rank `r` of `W` takes the `G/W`
//! positions starting at `b·G + r·G/W`, in `G/W ÷ micro_batch` micro-batches. Since neither the
//! order nor the batches depend on `W`, the state (epoch, sequences consumed globally, seed)
//! resumes on any world size with the same `G`. The last `N mod G` positions of an epoch's order
//! are dropped.
//!
//! **Each rank reads only its rows.** Inside a window, the positions sorted by their offset in
//! their global batch take the sequences sorted by storage place ([`window_order`]), so rank r's
//! offsets `[r·G/W, (r+1)·G/W)` take a contiguous run of the window's row groups: a rank reads
//! about `1/W + 1/shuffle_window` of the data set per epoch (a row group at a boundary between
//! two ranks' runs is read by both), not all of it.
//!
//! A background task on the process's shared storage runtime reads ahead window by window: for
//! each window it works out which of its sequences this rank needs, reads each row group holding
//! some of them once (a ranged read of the token column; bd3-storage retries it with back-off on
//! transient errors), decodes it and hands the decoded row groups over a bounded channel;
//! `next_batch` copies its sequences straight out of them. Memory stays at `prefetch_windows + 2`
//! windows of decoded row groups (queued, being consumed, being read): with the defaults at most
//! 4 × 8 × 4 MB, and about 1/W of that on each of W ranks.

use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use arrow_array::UInt32Array;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use storage::RetryConfig;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::loader::{shuffle, Batch, LoaderState, RankSlice};
use crate::manifest::{Manifest, ShardInfo, SplitName};
use crate::shard::{footer_len, ShardMeta};
use crate::store::{self, StoreUrl};

#[derive(Debug, Clone)]
pub struct ReaderConfig {
    pub split: SplitName,
    pub seed: u64,
    pub rank: usize,
    pub world_size: usize,
    /// Sequences per optimizer step over all ranks (micro-batch × accumulation × world size).
    pub global_batch: usize,
    /// Sequences per `next_batch`; divides `global_batch / world_size`.
    pub micro_batch: usize,
    /// Without shuffling the order is the stored one (validation).
    pub shuffle: bool,
    /// Row groups whose sequences are shuffled together. Part of the order: changing it changes
    /// which sequences a resumed run sees.
    pub shuffle_window: usize,
    /// Windows read ahead of the one being consumed.
    pub prefetch_windows: usize,
    /// Row groups read at once.
    pub concurrent_reads: usize,
    /// How each read is retried (bd3-storage's policy: transient errors only).
    pub retry: RetryConfig,
    /// Object-store options (endpoint, keys, …) over what the environment says.
    pub store_options: Vec<(String, String)>,
}

impl ReaderConfig {
    /// The training split, shuffled, with the default read-ahead.
    pub fn new(seed: u64, rank: usize, world_size: usize, global_batch: usize, micro_batch: usize) -> Self {
        Self {
            split: SplitName::Train,
            seed,
            rank,
            world_size,
            global_batch,
            micro_batch,
            shuffle: true,
            shuffle_window: 8,
            prefetch_windows: 2,
            concurrent_reads: 8,
            retry: RetryConfig::default(),
            store_options: Vec::new(),
        }
    }

    /// The validation split in its stored order.
    pub fn validation(rank: usize, world_size: usize, global_batch: usize, micro_batch: usize) -> Self {
        Self { split: SplitName::Valid, shuffle: false, ..Self::new(0, rank, world_size, global_batch, micro_batch) }
    }

    fn per_rank(&self) -> usize {
        self.global_batch / self.world_size
    }

    fn check(&self) -> Result<()> {
        let slice = RankSlice {
            rank: self.rank,
            world: self.world_size,
            global_batch: self.global_batch,
            micro_batch: self.micro_batch,
        };
        slice.check()?;
        ensure!(self.shuffle_window > 0, "shuffle window must be at least one row group");
        ensure!(self.retry.attempts > 0, "retry attempts must be at least 1");
        Ok(())
    }
}

/// What the read-ahead task needs, shared with it.
struct Source {
    dir: StoreUrl,
    manifest: Manifest,
    shards: Vec<ShardInfo>,
    metas: Vec<Arc<ShardMeta>>,
    config: ReaderConfig,
    /// Sequences in the split.
    total: u64,
}

/// This rank's sequences of one window, in order.
struct Chunk {
    epoch: u64,
    /// This rank's index (within the epoch) of the first sequence.
    first: u64,
    /// The decoded row groups the sequences come from; `next_batch` copies straight out of them.
    groups: Vec<UInt32Array>,
    /// Each sequence in order: (index into `groups`, sequence within that row group).
    slots: Vec<(u32, u32)>,
}

pub struct Reader {
    source: Arc<Source>,
    rx: mpsc::Receiver<Result<Chunk>>,
    task: JoinHandle<()>,
    chunk: Option<(Chunk, usize)>,
    epoch: u64,
    /// Sequences this rank has taken in the current epoch.
    local: u64,
    seed: u64,
    /// Bytes read at open (the shards' footers), before any row group.
    footer_bytes: u64,
}

impl Reader {
    /// Opens the data set whose `index.json` is at `manifest_url` (the directory or the file),
    /// checks every shard of the split against the manifest and starts reading ahead.
    pub fn open(manifest_url: &str, config: ReaderConfig) -> Result<Self> {
        config.check()?;
        let dir_url = manifest_url.strip_suffix(crate::manifest::MANIFEST_NAME).unwrap_or(manifest_url);
        let dir = store::open_with_options(dir_url.trim_end_matches('/'), config.store_options.clone())?
            .with_retry(config.retry.clone());
        let source = storage::block_on(open_source(dir, config))?;
        let (seed, footer_bytes) = (source.config.seed, source.dir.bytes_read());
        let (rx, task) = spawn_reader(&source, 0, 0, seed);
        Ok(Self { source, rx, task, chunk: None, epoch: 0, local: 0, seed, footer_bytes })
    }

    /// Bytes this reader has fetched from the store: the shards' footers at open, then the row
    /// groups of this rank's sequences.
    pub fn bytes_read(&self) -> u64 {
        self.source.dir.bytes_read()
    }

    /// Bytes of row groups fetched so far (what [`Self::bytes_read`] adds after the footers).
    pub fn row_group_bytes_read(&self) -> u64 {
        self.bytes_read() - self.footer_bytes
    }

    pub fn manifest(&self) -> &Manifest {
        &self.source.manifest
    }

    pub fn seq_len(&self) -> usize {
        self.source.manifest.seq_len
    }

    /// Sequences in the split.
    pub fn num_sequences(&self) -> u64 {
        self.source.total
    }

    /// Global batches in one epoch (the remainder of the order is dropped).
    pub fn batches_per_epoch(&self) -> u64 {
        self.source.total / self.source.config.global_batch as u64
    }

    fn local_per_epoch(&self) -> u64 {
        self.batches_per_epoch() * self.source.config.per_rank() as u64
    }

    /// The next `micro_batch` sequences of this rank.
    pub fn next_batch(&mut self) -> Result<Batch> {
        if self.local == self.local_per_epoch() {
            self.epoch += 1;
            self.local = 0;
        }
        let (micro, seq_len) = (self.source.config.micro_batch, self.seq_len());
        let mut tokens = Vec::with_capacity(micro * seq_len);
        while tokens.len() < micro * seq_len {
            if self.chunk.as_ref().is_none_or(|(c, used)| *used == c.slots.len()) {
                let next = storage::block_on(self.rx.recv()).context("the reader's read-ahead task stopped")??;
                let at = self.local + (tokens.len() / seq_len) as u64;
                ensure!(
                    next.epoch == self.epoch && next.first == at,
                    "internal error: read ahead epoch {} sequence {}, expected epoch {} sequence {at}",
                    next.epoch,
                    next.first,
                    self.epoch
                );
                self.chunk = Some((next, 0));
            }
            let (chunk, used) = self.chunk.as_mut().expect("set above");
            let take = (micro - tokens.len() / seq_len).min(chunk.slots.len() - *used);
            for &(group, row) in &chunk.slots[*used..*used + take] {
                let start = row as usize * seq_len;
                tokens.extend_from_slice(&chunk.groups[group as usize].values()[start..start + seq_len]);
            }
            *used += take;
        }
        self.local += micro as u64;
        Ok(Batch { tokens, micro_batch: micro, seq_len })
    }

    /// (epoch, sequences consumed by all ranks together, seed); the same on every rank.
    pub fn state(&self) -> LoaderState {
        let c = &self.source.config;
        if self.local == self.local_per_epoch() {
            return LoaderState { epoch: self.epoch + 1, consumed: 0, seed: self.seed };
        }
        let (b, j) = (self.local / c.per_rank() as u64, self.local % c.per_rank() as u64);
        LoaderState {
            epoch: self.epoch,
            consumed: b * c.global_batch as u64 + j * c.world_size as u64,
            seed: self.seed,
        }
    }

    /// Continues from `state`, saved by a reader with the same global batch on any world size.
    /// The state's seed replaces the configured one: the order must be the saved run's.
    pub fn restore(&mut self, state: LoaderState) -> Result<()> {
        let c = &self.source.config;
        let g = c.global_batch as u64;
        ensure!(
            state.consumed <= self.batches_per_epoch() * g,
            "loader state consumed {} sequences of an epoch of {} global batches of {g}",
            state.consumed,
            self.batches_per_epoch()
        );
        let (b, rem) = (state.consumed / g, state.consumed % g);
        let step = (c.world_size * c.micro_batch) as u64;
        ensure!(
            rem % step == 0,
            "loader state is {rem} sequences into a global batch, which {} ranks with micro-batches of {} cannot continue (save states between optimizer steps)",
            c.world_size,
            c.micro_batch
        );
        if state.seed != c.seed {
            tracing::info!(saved = state.seed, configured = c.seed, "data order follows the saved seed");
        }
        self.task.abort();
        self.epoch = state.epoch;
        self.local = b * c.per_rank() as u64 + rem / c.world_size as u64;
        self.seed = state.seed;
        self.chunk = None;
        let (rx, task) = spawn_reader(&self.source, self.epoch, self.local, self.seed);
        (self.rx, self.task) = (rx, task);
        Ok(())
    }
}

impl Drop for Reader {
    /// Stops the read-ahead (and, through [`AbortOnDrop`], the reads it started) quietly: a
    /// cancelled task is not a failed read, so nothing is retried or logged.
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A spawned task that is aborted when its handle is dropped, so that aborting the read-ahead
/// task also stops the row-group reads it spawned (the runtime outlives every reader).
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> std::future::Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

async fn open_source(dir: StoreUrl, config: ReaderConfig) -> Result<Arc<Source>> {
    let manifest = Manifest::load(&dir).await?;
    let split = manifest.split(config.split).clone();
    ensure!(!split.shards.is_empty(), "dataset {}: the {} split has no shards", dir.url, config.split);
    ensure!(
        split.sequences >= config.global_batch as u64,
        "dataset {}: the {} split has {} sequences, fewer than one global batch of {}",
        dir.url,
        config.split,
        split.sequences,
        config.global_batch
    );
    let metas: Vec<Arc<ShardMeta>> = futures::stream::iter(split.shards.iter())
        .map(|info| read_meta(&dir, info, &manifest))
        .buffered(16)
        .try_collect()
        .await?;
    Ok(Arc::new(Source { total: split.sequences, dir, manifest, shards: split.shards, metas, config }))
}

/// Checks a shard's size and footer against the manifest.
async fn read_meta(dir: &StoreUrl, info: &ShardInfo, manifest: &Manifest) -> Result<Arc<ShardMeta>> {
    let name = dir.display(&info.path);
    let size = dir.head(&info.path).await?.with_context(|| format!("shard {name} is missing"))?;
    ensure!(size == info.bytes, "shard {name} is {size} bytes, the manifest says {}", info.bytes);
    ensure!(info.bytes >= 12, "shard {name} is {} bytes, too short for a Parquet file", info.bytes);
    let mut start = info.bytes.saturating_sub(64 * 1024);
    let mut tail = dir.get_range(&info.path, start..info.bytes).await?;
    if let Some(len) = footer_len(&tail).filter(|&l| (l + 8) as u64 > info.bytes - start) {
        start = info.bytes.saturating_sub(len as u64 + 8);
        tail = dir.get_range(&info.path, start..info.bytes).await?;
    }
    let meta = ShardMeta::parse(&name, &tail, info, manifest.seq_len, manifest.row_group_sequences)?;
    Ok(Arc::new(meta))
}

fn spawn_reader(
    source: &Arc<Source>,
    epoch: u64,
    local: u64,
    seed: u64,
) -> (mpsc::Receiver<Result<Chunk>>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(source.config.prefetch_windows.max(1));
    let source = source.clone();
    let task = storage::spawn(async move {
        if let Err(e) = read_ahead(&source, epoch, local, seed, &tx).await {
            let _ = tx.send(Err(e)).await;
        }
    });
    (rx, task)
}

/// One row group in an epoch's order.
#[derive(Clone, Copy)]
struct Unit {
    shard: usize,
    group: usize,
    sequences: u64,
}

/// The epoch's row groups in order, cut into shuffle windows.
fn epoch_units(source: &Source, epoch: u64, seed: u64) -> Vec<Vec<Unit>> {
    let c = &source.config;
    let mut shards: Vec<usize> = (0..source.metas.len()).collect();
    let epoch_seed = seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    if c.shuffle {
        shuffle(&mut shards, epoch_seed);
    }
    let mut units = Vec::new();
    for s in shards {
        let mut groups: Vec<usize> = (0..source.metas[s].group_sequences.len()).collect();
        if c.shuffle {
            shuffle(&mut groups, epoch_seed ^ (s as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
        }
        units.extend(groups.into_iter().map(|g| Unit {
            shard: s,
            group: g,
            sequences: source.metas[s].group_sequences[g] as u64,
        }));
    }
    units.chunks(c.shuffle_window).map(<[Unit]>::to_vec).collect()
}

/// Reads this rank's sequences from (epoch, local index) on, window by window, forever.
async fn read_ahead(
    source: &Arc<Source>,
    mut epoch: u64,
    mut local: u64,
    seed: u64,
    tx: &mpsc::Sender<Result<Chunk>>,
) -> Result<()> {
    let c = &source.config;
    let (g, m, rank) = (c.global_batch as u64, c.per_rank() as u64, c.rank as u64);
    let epoch_end = source.total / g * g;
    loop {
        let windows = epoch_units(source, epoch, seed);
        // The global position of this rank's `local`-th sequence.
        let mut next = (local / m) * g + rank * m + local % m;
        let mut window_start = 0u64;
        for (w, units) in windows.iter().enumerate() {
            let len: u64 = units.iter().map(|u| u.sequences).sum();
            let window_end = (window_start + len).min(epoch_end);
            let mut wanted = Vec::new();
            while next < window_end {
                wanted.push(next - window_start);
                // Step to this rank's next position: the next one in its slice, or its slice of
                // the next global batch.
                next = if (next % g) + 1 < (rank + 1) * m { next + 1 } else { (next / g + 1) * g + rank * m };
            }
            if !wanted.is_empty() {
                let order = match c.shuffle {
                    true => {
                        let window_seed = seed
                            ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                            ^ (w as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407);
                        window_order(units, window_start, g, window_seed)
                    }
                    false => (0..len).collect(),
                };
                let count = wanted.len() as u64;
                let (groups, slots) = read_window(source, units, wanted.iter().map(|&p| order[p as usize])).await?;
                if tx.send(Ok(Chunk { epoch, first: local, groups, slots })).await.is_err() {
                    return Ok(()); // the reader is gone
                }
                local += count;
            }
            window_start += len;
            if window_start >= epoch_end {
                break;
            }
        }
        epoch += 1;
        local = 0;
    }
}

/// Where each position of a window takes its sequence from: position `p` holds the window's
/// sequence `order[p]`, the window's sequences being numbered through its row groups in turn.
///
/// The sequences are ranked by storage place (row groups in the window's order, the rows of each
/// group shuffled), the positions by their offset inside their global batch (batches start at
/// multiples of `global_batch` from the epoch's start; `window_start` is the window's first
/// position), and the k-th position takes the k-th sequence. A batch inside the window thus
/// takes every few sequences of the window, evenly from each row group, and since rank r takes
/// the offsets `[r·G/W, (r+1)·G/W)` of every batch, its sequences are a contiguous run of the
/// window's row groups: about 1/W of them, whatever W is, while the order depends on `G` only.
fn window_order(units: &[Unit], window_start: u64, global_batch: u64, seed: u64) -> Vec<u64> {
    let mut by_place = Vec::new();
    for (k, unit) in units.iter().enumerate() {
        let first = by_place.len() as u64;
        let mut rows: Vec<u64> = (first..first + unit.sequences).collect();
        shuffle(&mut rows, seed ^ (k as u64 + 1).wrapping_mul(0xD6E8_FEB8_6659_FD93));
        by_place.extend(rows);
    }
    let mut positions: Vec<usize> = (0..by_place.len()).collect();
    positions.sort_by_key(|&p| ((window_start + p as u64) % global_batch, p));
    let mut order = vec![0; by_place.len()];
    for (position, sequence) in positions.into_iter().zip(by_place) {
        order[position] = sequence;
    }
    order
}

/// The row groups holding the sequences at `picks` (indices into the window's concatenated row
/// groups), and where each of those sequences lies in them, in the order of `picks`.
async fn read_window(
    source: &Arc<Source>,
    units: &[Unit],
    picks: impl Iterator<Item = u64>,
) -> Result<(Vec<UInt32Array>, Vec<(u32, u32)>)> {
    let starts: Vec<u64> = units.iter().scan(0, |acc, u| Some(std::mem::replace(acc, *acc + u.sequences))).collect();
    // (unit, sequence in unit) of each pick, and the units needed.
    let located: Vec<(usize, u32)> = picks
        .map(|pick| {
            let u = starts.partition_point(|&s| s <= pick) - 1;
            (u, (pick - starts[u]) as u32)
        })
        .collect();
    let mut needed: Vec<usize> = located.iter().map(|&(u, _)| u).collect();
    needed.sort_unstable();
    needed.dedup();
    let mut reads = futures::stream::iter(needed)
        .map(|u| {
            let (source, unit) = (source.clone(), units[u]);
            AbortOnDrop(storage::spawn(async move { read_group(&source, unit).await.map(|t| (u, t)) }))
        })
        .buffer_unordered(source.config.concurrent_reads.max(1));
    let mut index = vec![u32::MAX; units.len()];
    let mut groups = Vec::new();
    while let Some(joined) = reads.next().await {
        let (u, tokens) = joined.context("a row-group read task failed")??;
        index[u] = groups.len() as u32;
        groups.push(tokens);
    }
    Ok((groups, located.into_iter().map(|(u, row)| (index[u], row)).collect()))
}

async fn read_group(source: &Source, unit: Unit) -> Result<UInt32Array> {
    let meta = &source.metas[unit.shard];
    let info = &source.shards[unit.shard];
    let range = meta.group_range(unit.group);
    if range.end > info.bytes {
        bail!(
            "shard {}: row group {} ends at byte {}, past the file's {} bytes",
            meta.name,
            unit.group,
            range.end,
            info.bytes
        );
    }
    let chunk: Bytes = source.dir.get_range(&info.path, range).await?;
    // decode_group checks the row count against the footer, which was checked against the manifest.
    meta.decode_group(unit.group, chunk, info, source.manifest.vocab_size)
}
