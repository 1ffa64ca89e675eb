//! Object stores by URL: plain paths and `file://` (local file system), `s3://` (with a custom
//! endpoint for S3-compatible servers), `gs://`, `az://` and `memory://`.
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
use object_store::ObjectStore;

/// A store and the prefix inside it that a URL names.
#[derive(Clone)]
pub struct StoreUrl {
    pub store: Arc<dyn ObjectStore>,
    /// The location the URL points at, relative to the store's root.
    pub prefix: Path,
    /// The URL as given, for messages.
    pub url: String,
}

impl std::fmt::Debug for StoreUrl {
    // The store's own Debug would print its configuration, which may include secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreUrl").field("url", &self.url).field("prefix", &self.prefix).finish()
    }
}

impl StoreUrl {
    /// `name` (one or more `/`-separated parts) under the prefix.
    pub fn child(&self, name: &str) -> Path {
        name.split('/').filter(|p| !p.is_empty()).fold(self.prefix.clone(), |p, part| p.join(part))
    }

    /// `url/name`, for messages.
    pub fn display(&self, name: &str) -> String {
        format!("{}/{}", self.url.trim_end_matches('/'), name)
    }
}

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
            Ok(StoreUrl { store: Arc::from(store), prefix, url: url.to_string() })
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
    Ok(StoreUrl { store: Arc::new(store), prefix: Path::default(), url: url.to_string() })
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
    Ok(StoreUrl { store, prefix, url: url.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStoreExt;

    fn round_trip(s: &StoreUrl) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let path = s.child("dir/object.bin");
            s.store.put(&path, b"hello store".to_vec().into()).await.unwrap();
            let got = s.store.get(&path).await.unwrap().bytes().await.unwrap();
            assert_eq!(&got[..], b"hello store");
            let range = s.store.get_range(&path, 6..11).await.unwrap();
            assert_eq!(&range[..], b"store");
        });
    }

    #[test]
    fn local_paths_file_urls_and_memory() {
        let dir = crate::testing::TempDir::new("store").unwrap();
        let plain = dir.path().join("a/b");
        let s = open(plain.to_str().unwrap()).unwrap();
        round_trip(&s);
        assert!(plain.join("dir/object.bin").is_file(), "a plain path is the local directory");
        let s = open(&format!("file://{}", dir.path().join("c").display())).unwrap();
        round_trip(&s);
        assert!(dir.path().join("c/dir/object.bin").is_file());

        let m = open("memory://store-test/pre").unwrap();
        round_trip(&m);
        let again = open("memory://store-test/pre").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async { again.store.head(&again.child("dir/object.bin")).await.unwrap() });
    }

    #[test]
    fn s3_on_a_local_server() {
        let server = crate::testing::S3TestServer::start().unwrap();
        server.create_bucket("bucket").unwrap();
        let s = open_with_options("s3://bucket/some/prefix", server.options()).unwrap();
        round_trip(&s);
        assert!(server.root().join("bucket/some/prefix/dir/object.bin").is_file());
    }

    #[test]
    fn bad_urls_are_named() {
        let err = open("ftp://host/x").unwrap_err();
        assert!(format!("{err:#}").contains("ftp://host/x"), "{err:#}");
        let err = open("s3:///nobucket").unwrap_err();
        assert!(format!("{err:#}").contains("names no bucket"), "{err:#}");
    }
}
