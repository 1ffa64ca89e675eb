//! Opening a URL: plain paths and `file://` (local file system), `s3://` (with a custom endpoint
//! for S3-compatible servers), `gs://`, `az://` and `memory://`.
//!
//! Credentials and endpoints come only from the standard environment variables (`AWS_*`,
//! `GOOGLE_*`, `AZURE_*`) and the files those name, or from explicit options; they are never
//! logged: errors and logs name the URL only.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{bail, Context, Result};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;

use crate::StoreUrl;

/// Opens `url` with credentials and endpoints from the environment only.
pub fn open(url: &str) -> Result<StoreUrl> {
    open_with_options(url, std::iter::empty())
}

/// Opens `url`; `options` (object_store configuration keys such as `aws_endpoint`,
/// `aws_allow_http`, `aws_access_key_id`) override what the environment says.
pub fn open_with_options(url: &str, options: impl IntoIterator<Item = (String, String)>) -> Result<StoreUrl> {
    let Some((scheme, _)) = url.split_once("://").filter(|(s, _)| is_scheme(s)) else {
        return open_local(PathBuf::from(url), url);
    };
    match scheme {
        "file" => {
            let parsed = url::Url::parse(url).with_context(|| format!("parsing URL {url}"))?;
            let path = parsed
                .to_file_path()
                .map_err(|()| anyhow::anyhow!("{url} does not name a local path (expected file:///absolute/path)"))?;
            open_local(path, url)
        }
        "memory" => open_memory(url),
        "s3" | "s3a" | "gs" | "az" | "azure" | "abfs" | "abfss" | "adl" => {
            let parsed = url::Url::parse(url).with_context(|| format!("parsing URL {url}"))?;
            if parsed.host_str().is_none_or(str::is_empty) {
                bail!("{url} names no bucket (expected {scheme}://bucket/prefix)");
            }
            let env = std::env::vars().filter(|(k, _)| is_store_env(k)).map(|(k, v)| (k.to_ascii_lowercase(), v));
            let explicit = options.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v));
            // Later keys win in the builders, so explicit options override the environment.
            let (store, prefix) = object_store::parse_url_opts(&parsed, env.chain(explicit))
                .with_context(|| format!("opening object store {url}"))?;
            Ok(StoreUrl::from_store(Arc::from(store), prefix, url))
        }
        other => bail!(
            "unsupported URL scheme `{other}` in {url} (expected a path, file://, s3://, gs://, az:// or memory://)"
        ),
    }
}

fn is_scheme(s: &str) -> bool {
    s.len() > 1 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '.')
}

fn is_store_env(key: &str) -> bool {
    ["AWS_", "GOOGLE_", "AZURE_"].iter().any(|p| key.starts_with(p))
}

fn open_local(dir: PathBuf, url: &str) -> Result<StoreUrl> {
    std::fs::create_dir_all(&dir).with_context(|| format!("creating directory {}", dir.display()))?;
    let store =
        LocalFileSystem::new_with_prefix(&dir).with_context(|| format!("opening directory {}", dir.display()))?;
    Ok(StoreUrl::new(Arc::new(store), Path::default(), url, Some(dir)))
}

/// `memory://name/prefix`: one in-memory store per name for the whole process, so that a writer
/// and a reader opened separately (as in tests) see the same objects.
fn open_memory(url: &str) -> Result<StoreUrl> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    let rest = &url["memory://".len()..];
    let (name, path) = rest.split_once('/').unwrap_or((rest, ""));
    let prefix = Path::parse(path).with_context(|| format!("invalid path `{path}` in {url}"))?;
    let mut stores = STORES.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    let store = stores.entry(name.to_string()).or_insert_with(|| Arc::new(InMemory::new())).clone();
    Ok(StoreUrl::from_store(store, prefix, url))
}
