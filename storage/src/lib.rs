//! Object stores by URL, for every bd3 crate that reads or writes data sets and checkpoints.
//!
//! [`open`] turns a URL (a plain path, `file://`, `s3://`, `gs://`, `az://`, `memory://`) into a
//! [`StoreUrl`]: a store, the prefix inside it, and the operations bd3 needs on names relative to
//! that prefix — atomic [`put`](StoreUrl::put), [`get`](StoreUrl::get), ranged gets,
//! [`head`](StoreUrl::head), [`list`](StoreUrl::list), [`delete`](StoreUrl::delete). Each
//! operation is retried with exponential back-off on transient failures ([`RetryConfig`]);
//! local locations use plain file I/O ([`local`]). All of it runs on one tokio runtime for the
//! whole process ([`runtime`]); blocking callers use [`block_on`].

mod local;
mod open;
mod retry;
mod runtime;
#[cfg(feature = "testing")]
pub mod testing;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Result};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

pub use local::STAGING_MARK;
pub use object_store;
pub use open::{open, open_with_options};
pub use retry::{is_not_found, retry, Failure, RetryConfig};
pub use runtime::{block_on, runtime, spawn};

/// A store and the prefix inside it that a URL names.
#[derive(Clone)]
pub struct StoreUrl {
    pub store: Arc<dyn ObjectStore>,
    /// The location the URL points at, relative to the store's root.
    pub prefix: Path,
    /// The URL as given, for messages.
    pub url: String,
    /// The directory the URL names when it is local: operations then use plain file I/O.
    pub local: Option<PathBuf>,
    /// How each operation is retried.
    pub retry: RetryConfig,
    /// Bytes that reads through this location (and its clones) returned: what a reader fetched
    /// from the store, counted where the bytes arrive.
    read_bytes: Arc<AtomicU64>,
}

/// One object found by [`StoreUrl::list`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectEntry {
    /// `/`-separated, relative to the URL's prefix.
    pub name: String,
    pub size: u64,
}

impl std::fmt::Debug for StoreUrl {
    // The store's own Debug would print its configuration, which may include secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreUrl").field("url", &self.url).field("prefix", &self.prefix).finish()
    }
}

impl StoreUrl {
    /// A store that is not local (or whose local fast path is not wanted), with the default retries.
    pub fn from_store(store: Arc<dyn ObjectStore>, prefix: Path, url: &str) -> Self {
        Self::new(store, prefix, url, None)
    }

    pub(crate) fn new(store: Arc<dyn ObjectStore>, prefix: Path, url: &str, local: Option<PathBuf>) -> Self {
        let read_bytes = Arc::new(AtomicU64::new(0));
        Self { store, prefix, url: url.to_string(), local, retry: RetryConfig::default(), read_bytes }
    }

    /// Bytes read through this location and its clones so far (whole objects and ranges).
    pub fn bytes_read(&self) -> u64 {
        self.read_bytes.load(Ordering::Relaxed)
    }

    fn count_read(&self, bytes: usize) {
        self.read_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// The same location with another retry policy.
    pub fn with_retry(mut self, retry: RetryConfig) -> Self {
        self.retry = retry;
        self
    }

    /// `name` (one or more `/`-separated parts) under the prefix.
    pub fn child(&self, name: &str) -> Path {
        name.split('/').filter(|p| !p.is_empty()).fold(self.prefix.clone(), |p, part| p.join(part))
    }

    /// `url/name`, for messages.
    pub fn display(&self, name: &str) -> String {
        format!("{}/{}", self.url.trim_end_matches('/'), name)
    }

    /// Refuses names that could leave the prefix or that no store spells the same way: each
    /// `/`-separated part must be non-empty and not `.` or `..`, and no part may hold `\`.
    /// The empty name (the prefix itself) is allowed only where `allow_empty`.
    fn check_name(&self, name: &str, allow_empty: bool) -> Result<()> {
        if name.is_empty() && allow_empty {
            return Ok(());
        }
        let bad = name.is_empty()
            || name.split('/').any(|p| p.is_empty() || p == "." || p == ".." || p.contains(['\\', '\0']));
        if bad {
            bail!(
                "`{name}` is not an object name under {} (expected `/`-separated parts, none empty, `.` or `..`)",
                self.url
            );
        }
        Ok(())
    }

    /// Runs one operation with retries; the error says what was being done to which object.
    async fn attempt<T, F, Fut>(&self, verb: &str, name: &str, op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let what = self.display(name);
        retry(&self.retry, &what, op).await.map_err(|e| anyhow::Error::new(e).context(format!("{verb} {what}")))
    }

    /// Runs a local file operation on a blocking thread of the current runtime.
    async fn on_disk<T: Send + 'static>(
        path: PathBuf,
        op: impl FnOnce(&std::path::Path) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, Failure> {
        match tokio::task::spawn_blocking(move || op(&path)).await {
            Ok(result) => result.map_err(Failure::Io),
            Err(_) => Err(Failure::Cancelled),
        }
    }

    /// Writes `chunks` (concatenated) as object `name`, atomically: readers see the previous
    /// object, or none, or all of the new one. Locally the bytes go to a staging file
    /// (`name#…`, see [`STAGING_MARK`]) renamed into place; an object store's single put is
    /// atomic by itself.
    pub async fn put(&self, name: &str, chunks: Vec<Bytes>) -> Result<()> {
        self.check_name(name, false)?;
        if let Some(dir) = &self.local {
            let (path, chunks) = (dir.join(name), Arc::new(chunks));
            return self
                .attempt("writing", name, || {
                    let chunks = chunks.clone();
                    Self::on_disk(path.clone(), move |p| local::put(p, &chunks))
                })
                .await;
        }
        let path = self.child(name);
        self.attempt("writing", name, || async {
            self.store.put(&path, PutPayload::from_iter(chunks.iter().cloned())).await.map(drop).map_err(Failure::from)
        })
        .await
    }

    /// Checks `name`, then runs `on_disk` (local) or `remote` (object stores) with retries.
    async fn one<T, F, Fut>(
        &self,
        verb: &str,
        name: &str,
        on_disk: fn(&std::path::Path) -> std::io::Result<T>,
        remote: F,
    ) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(Path) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        self.check_name(name, false)?;
        if let Some(dir) = &self.local {
            let path = dir.join(name);
            return self.attempt(verb, name, || Self::on_disk(path.clone(), on_disk)).await;
        }
        let path = self.child(name);
        self.attempt(verb, name, || remote(path.clone())).await
    }

    /// The whole object `name`; an error (see [`is_not_found`]) if there is none.
    pub async fn get(&self, name: &str) -> Result<Bytes> {
        let bytes = self
            .one("reading", name, local::get, |path| async move { Ok(self.store.get(&path).await?.bytes().await?) })
            .await?;
        self.count_read(bytes.len());
        Ok(bytes)
    }

    /// The whole object `name`, or `None` if there is none.
    pub async fn get_opt(&self, name: &str) -> Result<Option<Bytes>> {
        match self.get(name).await {
            Ok(b) => Ok(Some(b)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Bytes `range` of object `name`.
    pub async fn get_range(&self, name: &str, range: Range<u64>) -> Result<Bytes> {
        let mut one = self.get_ranges(name, std::slice::from_ref(&range)).await?;
        one.pop().ok_or_else(|| anyhow::anyhow!("reading {}: no bytes for range {range:?}", self.display(name)))
    }

    /// Several byte ranges of object `name`, in the order asked (object stores merge nearby ones
    /// into fewer requests). Empty ranges give empty buffers without a request.
    pub async fn get_ranges(&self, name: &str, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.check_name(name, false)?;
        if let Some(r) = ranges.iter().find(|r| r.start > r.end) {
            bail!("reading {}: byte range {r:?} ends before it starts", self.display(name));
        }
        let wanted: Vec<Range<u64>> = ranges.iter().filter(|r| !r.is_empty()).cloned().collect();
        let fetched = if wanted.is_empty() {
            Vec::new()
        } else if let Some(dir) = &self.local {
            let (path, shared) = (dir.join(name), Arc::new(wanted.clone()));
            self.attempt("reading", name, || {
                let wanted = shared.clone();
                Self::on_disk(path.clone(), move |p| local::get_ranges(p, &wanted))
            })
            .await?
        } else {
            let path = self.child(name);
            self.attempt("reading", name, || async { Ok(self.store.get_ranges(&path, &wanted).await?) }).await?
        };
        if fetched.len() != wanted.len() {
            bail!("reading {}: {} byte ranges asked, {} returned", self.display(name), wanted.len(), fetched.len());
        }
        self.count_read(fetched.iter().map(Bytes::len).sum());
        let mut fetched = fetched.into_iter();
        Ok(ranges
            .iter()
            .map(|r| if r.is_empty() { Bytes::new() } else { fetched.next().unwrap_or_default() })
            .collect())
    }

    /// The size of object `name`, or `None` if there is none.
    pub async fn head(&self, name: &str) -> Result<Option<u64>> {
        self.one("checking", name, local::head, |path| async move {
            match self.store.head(&path).await {
                Ok(meta) => Ok(Some(meta.size)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    /// Deletes object `name`; one that does not exist is fine.
    pub async fn delete(&self, name: &str) -> Result<()> {
        self.one("deleting", name, local::delete, |path| async move {
            match self.store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    /// Every object under directory `dir` (`""`: the whole prefix), recursively, sorted by name.
    /// Locally this includes staging files an interrupted [`put`](Self::put) left.
    pub async fn list(&self, dir: &str) -> Result<Vec<ObjectEntry>> {
        self.check_name(dir, true)?;
        let shown = if dir.is_empty() { self.url.clone() } else { self.display(dir) };
        let mut entries = if let Some(root) = &self.local {
            let (path, dir) = (root.join(dir), dir.to_string());
            retry(&self.retry, &shown, || {
                let dir = dir.clone();
                Self::on_disk(path.clone(), move |p| local::list(p, &dir))
            })
            .await
        } else {
            let path = self.child(dir);
            retry(&self.retry, &shown, || async {
                let objects: Vec<_> = self.store.list(Some(&path)).try_collect().await?;
                Ok(objects
                    .into_iter()
                    .filter_map(|o| self.relative(&o.location).map(|name| ObjectEntry { name, size: o.size }))
                    .collect())
            })
            .await
        }
        .map_err(|e| anyhow::Error::new(e).context(format!("listing {shown}")))?;
        entries.sort();
        Ok(entries)
    }

    /// The names of the directories (common prefixes) directly under `dir` (`""`: the prefix).
    pub async fn list_dirs(&self, dir: &str) -> Result<Vec<String>> {
        self.check_name(dir, true)?;
        let shown = if dir.is_empty() { self.url.clone() } else { self.display(dir) };
        let mut names = if let Some(root) = &self.local {
            let path = root.join(dir);
            retry(&self.retry, &shown, || Self::on_disk(path.clone(), local::list_dirs)).await
        } else {
            let path = self.child(dir);
            retry(&self.retry, &shown, || async {
                let listing = self.store.list_with_delimiter(Some(&path)).await?;
                Ok(listing.common_prefixes.iter().filter_map(|d| d.filename().map(String::from)).collect())
            })
            .await
        }
        .map_err(|e| anyhow::Error::new(e).context(format!("listing {shown}")))?;
        names.sort();
        Ok(names)
    }

    /// Removes directory `dir` if it is local and empty (object stores have no directories).
    pub fn remove_empty_dir(&self, dir: &str) {
        if let (Some(root), Ok(())) = (&self.local, self.check_name(dir, false)) {
            let _ = std::fs::remove_dir(root.join(dir)); // fails, as it should, when anything is left
        }
    }

    /// `location`'s name relative to the prefix (`None` if it lies outside).
    fn relative(&self, location: &Path) -> Option<String> {
        let parts: Vec<String> = location.prefix_match(&self.prefix)?.map(|p| p.as_ref().to_string()).collect();
        (!parts.is_empty()).then(|| parts.join("/"))
    }
}
