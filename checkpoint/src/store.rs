//! A checkpoint location (`file://`, a local path, `s3://…`, …) holding one directory per step:
//!
//! ```text
//! <url>/step-0000000100/rank-00000-000.safetensors   tensors (or slices) rank 0 holds
//!                       rank-00000.json              what rank 0 wrote, with checksums
//!                       rank-00001-000.safetensors …
//!                       manifest.json                merged by rank 0 once every rank is done
//!                       COMMITTED                    written last; without it the step does not exist
//! ```

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use storage::StoreUrl;
use tracing::{info, warn};

use crate::finite;
use crate::manifest::{
    parse_rank_file, parse_rank_index, rank_file, rank_index, step_dir, CheckpointMeta, FileEntry, Manifest, Piece,
    RankIndex, TensorEntry, FORMAT_VERSION, WRITER,
};
use crate::safetensors::{self, TensorView};
use crate::slice::{copy_region, Slice};
use crate::TensorBuffer;

const MARKER: &str = "COMMITTED";
const MANIFEST: &str = "manifest.json";

/// A tensor, or the part of it this rank holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalTensor {
    /// Name, dtype, the shape of the part held here, and its bytes.
    pub buffer: TensorBuffer,
    pub global_shape: Vec<usize>,
    /// Where the part starts in the global tensor.
    pub offsets: Vec<usize>,
}

impl LocalTensor {
    /// A tensor held whole by this rank.
    pub fn whole(buffer: TensorBuffer) -> Self {
        Self { global_shape: buffer.shape.clone(), offsets: vec![0; buffer.shape.len()], buffer }
    }

    pub fn slice(&self) -> Slice {
        Slice { offsets: self.offsets.clone(), shape: self.buffer.shape.clone() }
    }
}

/// Keep the latest `keep_latest` committed steps plus every step divisible by `keep_every`
/// (0: none) forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub keep_latest: usize,
    pub keep_every: u64,
}

/// How a rank writes its part.
#[derive(Debug, Clone, Copy)]
pub struct WriteOptions {
    /// A rank's tensors are split into files of at most about this many bytes.
    pub max_file_bytes: u64,
    /// How long rank 0 waits for the other ranks' parts before giving up on a step.
    pub commit_timeout: Duration,
    /// The same for every rank of one job and different between jobs (the trainer broadcasts
    /// rank 0's): written into each rank index, and rank 0 commits only indices carrying its own.
    /// A step rewritten by a later job (a run resumed from an earlier step) may still hold another
    /// rank's index from the first job; without this, rank 0 could merge it before that rank
    /// rewrites it.
    pub attempt: u64,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self { max_file_bytes: 4 << 30, commit_timeout: Duration::from_secs(1800), attempt: 0 }
    }
}

/// A step directory and whether it was committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepStatus {
    pub step: u64,
    pub committed: bool,
}

/// Where `latest_valid` found a usable checkpoint, and the newer steps it had to skip (with why).
#[derive(Debug)]
pub struct ResumePoint {
    pub manifest: Option<Manifest>,
    pub skipped: Vec<(u64, String)>,
}

/// The checkpoints under one URL.
pub struct CheckpointStore {
    /// Where the steps live (bd3-storage: retries, atomic puts, plain file I/O when local).
    dir: StoreUrl,
    url: String,
}

/// Whether a file name is one this crate writes into a step directory (retention and clean-up
/// delete nothing else): the marker, the manifest, a rank index or a rank's tensor file, or the
/// staging file (`name#…`) an interrupted local write of one of those left.
fn is_ours(name: &str) -> bool {
    let base = name.split_once(storage::STAGING_MARK).map_or(name, |(base, _)| base);
    base == MARKER || base == MANIFEST || parse_rank_file(base).is_some() || parse_rank_index(base).is_some()
}

impl CheckpointStore {
    /// Opens a checkpoint URL: a local path, `file://`, `s3://bucket/prefix` and the other
    /// object-store schemes. Credentials and endpoints come from the standard environment.
    pub fn open(url: &str) -> Result<Self> {
        Self::open_with_options(url, Vec::new())
    }

    /// As [`open`](Self::open), with explicit object-store options (endpoint, keys, …).
    pub fn open_with_options(url: &str, options: Vec<(String, String)>) -> Result<Self> {
        let dir =
            storage::open_with_options(url, options).with_context(|| format!("opening checkpoint location {url}"))?;
        Ok(Self::from_location(dir))
    }

    /// The checkpoints under an already opened location.
    pub fn from_location(dir: StoreUrl) -> Self {
        let url = dir.url.trim_end_matches('/').to_string();
        Self { dir, url }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// `step-…/file`: the object name under the location.
    fn name(step: u64, file: &str) -> String {
        format!("{}/{file}", step_dir(step))
    }

    /// `url/step-…/file`, for messages.
    fn display(&self, step: u64, file: &str) -> String {
        format!("{}/{}/{file}", self.url, step_dir(step))
    }

    fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        storage::block_on(f)
    }

    // ---- I/O primitives: bd3-storage (atomic puts, retries, plain file I/O when local). ----------

    /// Writes a file atomically: readers see the whole file or none.
    async fn put_file(&self, step: u64, file: &str, chunks: Vec<Bytes>) -> Result<()> {
        self.dir.put(&Self::name(step, file), chunks).await
    }

    /// A whole file, or `None` if it does not exist.
    async fn get_file(&self, step: u64, file: &str) -> Result<Option<Bytes>> {
        self.dir.get_opt(&Self::name(step, file)).await
    }

    async fn get_ranges(&self, step: u64, file: &str, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.dir.get_ranges(&Self::name(step, file), ranges).await
    }

    async fn get_range(&self, step: u64, file: &str, range: Range<u64>) -> Result<Bytes> {
        self.dir.get_range(&Self::name(step, file), range).await
    }

    async fn exists(&self, step: u64, file: &str) -> Result<bool> {
        Ok(self.dir.head(&Self::name(step, file)).await?.is_some())
    }

    async fn delete_file(&self, step: u64, file: &str) -> Result<()> {
        self.dir.delete(&Self::name(step, file)).await
    }

    /// The step numbers of every `step-…` directory.
    async fn list_steps(&self) -> Result<Vec<u64>> {
        let parse = |n: &str| n.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok());
        Ok(self.dir.list_dirs("").await?.iter().filter_map(|d| parse(d)).collect())
    }

    /// The names of the files directly in a step directory (staging files of a local writer
    /// included).
    async fn list_files(&self, step: u64) -> Result<Vec<String>> {
        let dir = step_dir(step);
        let listed = self.dir.list(&dir).await?;
        Ok(listed
            .into_iter()
            .filter_map(|e| e.name.strip_prefix(&dir)?.strip_prefix('/').filter(|n| !n.contains('/')).map(String::from))
            .collect())
    }

    /// Every step directory, committed or not, in increasing order.
    pub fn steps(&self) -> Result<Vec<StepStatus>> {
        self.block_on(async {
            let mut steps = vec![];
            for step in self.list_steps().await? {
                steps.push(StepStatus { step, committed: self.exists(step, MARKER).await? });
            }
            steps.sort_by_key(|s| s.step);
            Ok(steps)
        })
    }

    pub fn committed_steps(&self) -> Result<Vec<u64>> {
        Ok(self.steps()?.into_iter().filter(|s| s.committed).map(|s| s.step).collect())
    }

    /// Writes this rank's tensors (or slices) for `step` and its index. Ranks write disjoint
    /// parts in parallel; nothing here is visible to readers until [`commit`](Self::commit).
    /// A rank may hold several disjoint boxes of one tensor (a ZeRO shard of a flattened tensor
    /// covers a range that is not one box): each goes into its own file, since a file names a
    /// tensor once.
    pub fn write_rank(
        &self,
        step: u64,
        rank: usize,
        world_size: usize,
        mut tensors: Vec<LocalTensor>,
        options: WriteOptions,
    ) -> Result<RankIndex> {
        ensure!(rank < world_size, "rank {rank} is not below the world size {world_size}");
        tensors.sort_by(|a, b| a.buffer.name.cmp(&b.buffer.name));
        let mut index = RankIndex {
            step,
            rank,
            world_size,
            attempt: options.attempt,
            tensors: BTreeMap::new(),
            files: BTreeMap::new(),
        };
        // Greedy split into files of at most max_file_bytes (a tensor larger than that gets its own).
        let mut groups: Vec<Vec<LocalTensor>> = vec![];
        let mut size = 0u64;
        for t in tensors {
            ensure!(
                t.slice().fits(&t.global_shape),
                "tensor `{}`: part {:?} at {:?} does not fit shape {:?}",
                t.buffer.name,
                t.buffer.shape,
                t.offsets,
                t.global_shape
            );
            let bytes = t.buffer.data.len() as u64;
            // Sorted by name, so another box of the same tensor is the group's last entry.
            let same_name = groups.last().and_then(|g| g.last()).is_some_and(|l| l.buffer.name == t.buffer.name);
            if groups.is_empty() || same_name || (size + bytes > options.max_file_bytes && size > 0) {
                groups.push(vec![]);
                size = 0;
            }
            size += bytes;
            groups.last_mut().expect("a group").push(t);
        }
        // Encode every file and checksum it first, checking the floating-point data in the same
        // pass: a state with NaN or ±Inf is refused before anything of this step changes.
        let mut files = Vec::with_capacity(groups.len());
        let mut non_finite = Vec::new();
        for (part, group) in groups.into_iter().enumerate() {
            let file = rank_file(rank, part);
            let mut views = Vec::with_capacity(group.len());
            for t in &group {
                let entry = index.tensors.entry(t.buffer.name.clone()).or_insert_with(|| TensorEntry {
                    dtype: t.buffer.dtype,
                    shape: t.global_shape.clone(),
                    pieces: vec![],
                });
                entry.pieces.push(Piece { file: file.clone(), slice: t.slice() });
            }
            for t in group {
                views.push((t.buffer.name, t.buffer.dtype, t.buffer.shape, Bytes::from(t.buffer.data)));
            }
            let tensor_views: Vec<TensorView<'_>> = views
                .iter()
                .map(|(name, dtype, shape, data)| TensorView { name, dtype: *dtype, shape, data: data.clone() })
                .collect();
            let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
            let chunks = safetensors::encode(&tensor_views, &meta)?;
            drop(tensor_views);
            // chunks[0] is the header, then one chunk per tensor in `views` order.
            let mut crc = crc32c::crc32c(&chunks[0]);
            for ((name, dtype, _, _), data) in views.iter().zip(&chunks[1..]) {
                let (next, bad) = finite::crc_and_count_non_finite(crc, *dtype, data);
                crc = next;
                if bad > 0 {
                    non_finite
                        .push(format!("`{name}` ({bad} of {} {dtype:?} values)", data.len() / dtype.size_bytes()));
                }
            }
            let bytes = chunks.iter().map(|c| c.len() as u64).sum();
            index.files.insert(file.clone(), FileEntry { rank, bytes, crc32c: crc });
            files.push((file, chunks));
        }
        ensure!(
            non_finite.is_empty(),
            "refusing to checkpoint step {step} (rank {rank}): non-finite values (NaN or ±Inf) in tensor {}; nothing of this step was written",
            non_finite.join(", tensor ")
        );
        if rank == 0 {
            // Rewriting a step (a run resumed from an earlier one): it stops existing for readers
            // before any of its files change.
            self.uncommit(step)?;
        }
        self.block_on(async {
            for (file, chunks) in files {
                self.put_file(step, &file, chunks).await?;
            }
            let json = serde_json::to_vec_pretty(&index)?;
            self.put_file(step, &rank_index(rank), vec![json.into()]).await?;
            Ok::<_, anyhow::Error>(())
        })?;
        Ok(index)
    }

    /// Rank 0: waits until every rank's index of this `attempt` exists (an index left by another
    /// job counts as not yet written), merges them into `manifest.json`, then writes the commit
    /// marker. Only after the marker does the step exist for readers.
    pub fn commit(
        &self,
        step: u64,
        world_size: usize,
        meta: CheckpointMeta,
        attempt: u64,
        timeout: Duration,
    ) -> Result<Manifest> {
        let started = Instant::now();
        let ranks = self.block_on(async {
            let mut ranks = Vec::with_capacity(world_size);
            for rank in 0..world_size {
                loop {
                    let mut stale = None;
                    if let Some(bytes) = self.get_file(step, &rank_index(rank)).await? {
                        let source = self.display(step, &rank_index(rank));
                        let index: RankIndex =
                            serde_json::from_slice(&bytes).with_context(|| format!("{source}: not a rank index"))?;
                        ensure!(index.rank == rank, "{source}: field `rank`: says {}, expected {rank}", index.rank);
                        if index.attempt == attempt {
                            index.check_file_names(&source)?;
                            ranks.push(index);
                            break;
                        }
                        stale = Some(index.attempt);
                    }
                    if started.elapsed() >= timeout {
                        let found = stale.map_or(String::new(), |a| format!(" (its index there is from attempt {a})"));
                        bail!("step {step}: rank {rank} did not finish writing attempt {attempt} within {timeout:?}{found}");
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            Ok(ranks)
        })?;
        let manifest = Manifest::merge(step, world_size, ranks, meta)?;
        let json = serde_json::to_vec_pretty(&manifest)?;
        let marker = format!("{{\"manifest_crc32c\": {}}}\n", crc32c::crc32c(&json));
        self.block_on(async {
            self.put_file(step, MANIFEST, vec![json.into()]).await?;
            self.put_file(step, MARKER, vec![marker.into_bytes().into()]).await
        })
        .with_context(|| format!("committing step {step} in {}", self.url))?;
        info!(step, bytes = manifest.total_bytes(), url = %self.url, "checkpoint committed");
        Ok(manifest)
    }

    /// Removes a step's commit marker (its files stay until overwritten or cleaned): the step no
    /// longer exists for readers.
    pub fn uncommit(&self, step: u64) -> Result<()> {
        self.block_on(self.delete_file(step, MARKER))
    }

    /// Writes this rank's part and, on rank 0, commits the step.
    pub fn save(
        &self,
        step: u64,
        rank: usize,
        world_size: usize,
        tensors: Vec<LocalTensor>,
        meta: Option<CheckpointMeta>,
        options: WriteOptions,
    ) -> Result<Option<Manifest>> {
        self.write_rank(step, rank, world_size, tensors, options)?;
        match meta {
            Some(meta) if rank == 0 => {
                Ok(Some(self.commit(step, world_size, meta, options.attempt, options.commit_timeout)?))
            }
            _ => Ok(None),
        }
    }

    /// The manifest of a committed step.
    pub fn manifest(&self, step: u64) -> Result<Manifest> {
        let (marker, json) = self.block_on(async {
            let marker = self.get_file(step, MARKER).await?.with_context(|| {
                format!("step {step} of {} is not committed (no {MARKER} marker): it was never finished", self.url)
            })?;
            let json = self
                .get_file(step, MANIFEST)
                .await?
                .with_context(|| format!("{} is missing", self.display(step, MANIFEST)))?;
            Ok::<_, anyhow::Error>((marker, json))
        })?;
        let file = format!("{}/{}/{MANIFEST}", self.url, step_dir(step));
        let expected: serde_json::Value =
            serde_json::from_slice(&marker).with_context(|| format!("{}/{}/{MARKER}", self.url, step_dir(step)))?;
        ensure!(
            expected["manifest_crc32c"].as_u64() == Some(crc32c::crc32c(&json) as u64),
            "{file}: checksum does not match the one in {MARKER}"
        );
        let manifest: Manifest = serde_json::from_slice(&json).with_context(|| format!("{file}: not a manifest"))?;
        ensure!(
            manifest.format_version == FORMAT_VERSION,
            "{file}: format version {} (this bd3 reads {FORMAT_VERSION})",
            manifest.format_version
        );
        ensure!(manifest.step == step, "{file}: says step {}", manifest.step);
        manifest.check_file_names(&file)?;
        Ok(manifest)
    }

    /// Reads every file of a step and compares sizes and checksums with the manifest; the error
    /// names the first bad file.
    pub fn verify(&self, manifest: &Manifest) -> Result<()> {
        manifest.check_file_names(&self.display(manifest.step, MANIFEST))?;
        self.block_on(async {
            for (file, entry) in &manifest.files {
                let name = self.display(manifest.step, file);
                let bytes = self.get_file(manifest.step, file).await?.with_context(|| format!("{name} is missing"))?;
                ensure!(
                    bytes.len() as u64 == entry.bytes,
                    "{name}: {} bytes, the manifest says {}",
                    bytes.len(),
                    entry.bytes
                );
                let crc = crc32c::crc32c(&bytes);
                ensure!(
                    crc == entry.crc32c,
                    "{name}: checksum {crc:#010x} does not match the manifest's {:#010x} (the shard is corrupt)",
                    entry.crc32c
                );
            }
            Ok(())
        })
    }

    /// The newest committed step whose files all verify. Each newer step that fails is skipped
    /// with a warning naming the bad file, and listed in the result.
    pub fn latest_valid(&self) -> Result<ResumePoint> {
        let mut skipped = vec![];
        for step in self.committed_steps()?.into_iter().rev() {
            match self.manifest(step).and_then(|m| self.verify(&m).map(|()| m)) {
                Ok(m) => return Ok(ResumePoint { manifest: Some(m), skipped }),
                Err(e) => {
                    let reason = format!("{e:#}");
                    warn!(step, error = %reason, "checkpoint unusable, falling back to an earlier step");
                    skipped.push((step, reason));
                }
            }
        }
        Ok(ResumePoint { manifest: None, skipped })
    }

    /// Reads box `want` of tensor `name` (for a whole tensor, `Slice::whole(&entry.shape)`),
    /// assembled from whatever pieces the writers held: any number of writers, any number of
    /// readers.
    pub fn read(&self, manifest: &Manifest, name: &str, want: &Slice) -> Result<TensorBuffer> {
        let mut out = self.read_many(manifest, &[(name.to_string(), want.clone())])?;
        Ok(out.pop().expect("one request, one buffer"))
    }

    /// Reads several boxes at once: each file's header is read once and all the byte ranges
    /// needed from a file are fetched in one request (a rank's whole state loads this way).
    pub fn read_many(&self, manifest: &Manifest, requests: &[(String, Slice)]) -> Result<Vec<TensorBuffer>> {
        manifest.check_file_names(&self.display(manifest.step, MANIFEST))?;
        let step_url = format!("{}/{}", self.url, step_dir(manifest.step));
        // Which piece of which file each request needs: (request, piece).
        let mut by_file: BTreeMap<&str, Vec<(usize, &Piece)>> = BTreeMap::new();
        let mut outs = Vec::with_capacity(requests.len());
        for (i, (name, want)) in requests.iter().enumerate() {
            let entry = manifest
                .tensors
                .get(name)
                .with_context(|| format!("step {} of {} has no tensor `{name}`", manifest.step, self.url))?;
            ensure!(want.fits(&entry.shape), "tensor `{name}`: {want:?} lies outside its shape {:?}", entry.shape);
            for piece in &entry.pieces {
                if piece.slice.intersect(want).is_some() {
                    by_file.entry(piece.file.as_str()).or_default().push((i, piece));
                }
            }
            outs.push(None::<Vec<u8>>);
        }
        self.block_on(async {
            for (file, needs) in by_file {
                let header = self.read_header(manifest, file).await?;
                let name_of = |i: usize| requests[i].0.as_str();
                let mut ranges = Vec::with_capacity(needs.len());
                for &(i, piece) in &needs {
                    let (name, entry) = (name_of(i), &manifest.tensors[name_of(i)]);
                    let (range, stored) = match (header.byte_range(name), header.tensors.get(name)) {
                        (Some(r), Some(e)) => (r, e),
                        _ => bail!("{step_url}/{file}: has no tensor `{name}` although the manifest says so"),
                    };
                    ensure!(
                        stored.dtype == entry.dtype && stored.shape == piece.slice.shape,
                        "{step_url}/{file}: tensor `{name}` is {:?}{:?}, the manifest says {:?}{:?}",
                        stored.dtype,
                        stored.shape,
                        entry.dtype,
                        piece.slice.shape
                    );
                    ranges.push(range);
                }
                let chunks = self.get_ranges(manifest.step, file, &ranges).await?;
                for ((i, piece), bytes) in needs.into_iter().zip(chunks) {
                    let want = &requests[i].1;
                    if piece.slice == *want {
                        // The common case (same process layout as the writer): no copy.
                        outs[i] = Some(Vec::from(bytes));
                        continue;
                    }
                    let region = piece.slice.intersect(want).expect("selected for overlapping");
                    let elem = manifest.tensors[name_of(i)].dtype.size_bytes();
                    let out = outs[i].get_or_insert_with(|| vec![0u8; want.numel() * elem]);
                    copy_region(&piece.slice, &bytes, want, out, &region, elem);
                }
            }
            Ok::<_, anyhow::Error>(())
        })?;
        requests
            .iter()
            .zip(outs)
            .map(|((name, want), data)| {
                let dtype = manifest.tensors[name].dtype;
                let data = data.unwrap_or_else(|| vec![0u8; want.numel() * dtype.size_bytes()]);
                Ok(TensorBuffer::new(name.as_str(), dtype, want.shape.clone(), data)?)
            })
            .collect()
    }

    async fn read_header(&self, manifest: &Manifest, file: &str) -> Result<safetensors::Header> {
        let name = self.display(manifest.step, file);
        let size = manifest.files.get(file).with_context(|| format!("{name}: not listed in the manifest"))?.bytes;
        let first = self.get_range(manifest.step, file, 0..8.min(size)).await?;
        let n = safetensors::header_len(&first, size, &name)?;
        let json = self.get_range(manifest.step, file, 8..8 + n).await?;
        safetensors::parse_header(&json, size, &name)
    }

    /// Deletes committed steps that the policy does not keep. Only complete checkpoints written
    /// by bd3 are touched; the marker goes first, so an interrupted deletion never leaves
    /// something that looks committed. Returns the deleted steps.
    pub fn apply_retention(&self, policy: Retention) -> Result<Vec<u64>> {
        ensure!(policy.keep_latest >= 2, "checkpoint.keep_latest is {}; at least 2 must be kept", policy.keep_latest);
        let committed = self.committed_steps()?;
        let cut = committed.len().saturating_sub(policy.keep_latest);
        let mut deleted = vec![];
        for &step in &committed[..cut] {
            if policy.keep_every > 0 && step % policy.keep_every == 0 {
                continue;
            }
            let manifest = match self.manifest(step) {
                Ok(m) if m.writer == WRITER => m,
                Ok(_) | Err(_) => {
                    warn!(step, url = %self.url, "not deleting a checkpoint bd3 cannot vouch for having written");
                    continue;
                }
            };
            self.delete_committed(&manifest)?;
            deleted.push(step);
        }
        Ok(deleted)
    }

    fn delete_committed(&self, manifest: &Manifest) -> Result<()> {
        let step = manifest.step;
        manifest.check_file_names(&self.display(step, MANIFEST))?;
        let mut files = vec![MARKER.to_string(), MANIFEST.to_string()];
        files.extend(manifest.files.keys().cloned());
        files.extend((0..manifest.world_size).map(rank_index));
        self.delete_files(step, &files)?;
        info!(step, url = %self.url, "deleted checkpoint (retention)");
        Ok(())
    }

    /// Deletes files of a step directory; names that are not ours are refused before anything
    /// is deleted.
    fn delete_files(&self, step: u64, files: &[String]) -> Result<()> {
        if let Some(bad) = files.iter().find(|f| !is_ours(f)) {
            bail!("refusing to delete `{bad}` in {}: not a file bd3 writes into a checkpoint", self.display(step, ""));
        }
        self.block_on(async {
            for file in files {
                self.delete_file(step, file).await?;
            }
            Ok::<_, anyhow::Error>(())
        })?;
        self.dir.remove_empty_dir(&step_dir(step)); // only succeeds when nothing foreign is left
        Ok(())
    }

    /// Removes step directories that were never committed (a writer died mid-save). Call it only
    /// when no save is in flight, e.g. when a run starts. Only files bd3 writes are deleted.
    pub fn clean_partial(&self) -> Result<Vec<u64>> {
        let mut cleaned = vec![];
        for s in self.steps()?.into_iter().filter(|s| !s.committed) {
            let listed = self.block_on(self.list_files(s.step))?;
            let ours: Vec<String> = listed.into_iter().filter(|n| is_ours(n)).collect();
            warn!(step = s.step, files = ours.len(), url = %self.url, "removing an uncommitted checkpoint");
            self.delete_files(s.step, &ours)?;
            cleaned.push(s.step);
        }
        Ok(cleaned)
    }
}
