//! The local fast path: plain `std::fs` calls on the directory a local URL names (object_store's
//! local backend moved checkpoint data several times slower). Each runs on the runtime's blocking
//! threads, so an I/O-heavy task never stalls the runtime's workers.

use std::fs::File;
use std::io::{self, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::ObjectEntry;

/// Marks a staging file: `name#pid.n` is written in full, then renamed to `name`. A writer killed
/// in between leaves one behind; it is never a complete object.
pub const STAGING_MARK: char = '#';

/// Writes `chunks` to `path` atomically: readers see the old file, or none, or the whole new one.
pub fn put(path: &Path, chunks: &[Bytes]) -> io::Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut staged = path.as_os_str().to_owned();
    staged.push(format!("{STAGING_MARK}{}.{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
    let write = || -> io::Result<()> {
        let mut f = File::create(&staged)?;
        for c in chunks {
            f.write_all(c)?;
        }
        // On disk before the rename makes it visible: a crash never leaves a short file under the name.
        f.sync_data()?;
        std::fs::rename(&staged, path)
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&staged);
    })
}

pub fn get(path: &Path) -> io::Result<Bytes> {
    std::fs::read(path).map(Bytes::from)
}

pub fn get_ranges(path: &Path, ranges: &[Range<u64>]) -> io::Result<Vec<Bytes>> {
    let f = File::open(path)?;
    ranges
        .iter()
        .map(|r| {
            let mut buf = vec![0u8; r.end.saturating_sub(r.start) as usize];
            f.read_exact_at(&mut buf, r.start).map_err(|e| io::Error::new(e.kind(), format!("bytes {r:?}: {e}")))?;
            Ok(Bytes::from(buf))
        })
        .collect()
}

/// The size of the file at `path`, `None` if there is none (a directory is not an object).
pub fn head(path: &Path) -> io::Result<Option<u64>> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(Some(m.len())),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes a file; one that is already gone is fine.
pub fn delete(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Every file under `dir` (recursively; staging files included), named `name_prefix` + its path
/// below `dir`. A missing directory holds nothing.
pub fn list(dir: &Path, name_prefix: &str) -> io::Result<Vec<ObjectEntry>> {
    let mut out = Vec::new();
    let mut todo = vec![(dir.to_path_buf(), name_prefix.to_string())];
    while let Some((dir, prefix)) = todo.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let Some(file) = entry.file_name().to_str().map(String::from) else { continue };
            let name = if prefix.is_empty() { file } else { format!("{prefix}/{file}") };
            // Symbolic links to files are followed; links to directories are not (no cycles).
            let meta = match std::fs::metadata(entry.path()) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // a dangling link, or just deleted
                Err(e) => return Err(e),
            };
            if meta.is_dir() && !entry.file_type()?.is_symlink() {
                todo.push((entry.path(), name));
            } else if meta.is_file() {
                out.push(ObjectEntry { name, size: meta.len() });
            }
        }
    }
    Ok(out)
}

/// The names of the directories directly in `dir` (symbolic links to directories included).
pub fn list_dirs(dir: &Path) -> io::Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        if entry.path().is_dir() {
            out.extend(entry.file_name().to_str().map(String::from));
        }
    }
    Ok(out)
}
