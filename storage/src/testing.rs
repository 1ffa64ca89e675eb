//! Test support (the `testing` feature) for the crates that talk to object stores: a real S3-compatible server
//! (`s3s-fs`, built into `.tools/bin` by `scripts/setup.sh`) on 127.0.0.1, and temporary
//! directories that remove themselves.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub use tempfile::TempDir;

/// A fresh directory `bd3-<tag>-…` under the system temp dir, removed on drop.
pub fn temp_dir(tag: &str) -> Result<TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("bd3-{tag}-"))
        .tempdir()
        .with_context(|| format!("creating a {tag} directory"))
}

/// The test server's fixed credentials (for clients other than object_store, such as a benchmark's pyarrow).
pub const ACCESS_KEY: &str = "bd3-test-access";
pub const SECRET_KEY: &str = "bd3-test-secret-key";
const REGION: &str = "us-east-1";

/// An `s3s-fs` process serving a temporary directory on 127.0.0.1; killed on drop.
pub struct S3TestServer {
    child: Option<Child>,
    port: u16,
    root: TempDir,
}

impl S3TestServer {
    /// The server binary, relative to the workspace root.
    pub fn binary() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin/s3s-fs")
    }

    /// Starts a server on a free port with an empty data directory.
    pub fn start() -> Result<Self> {
        let bin = Self::binary();
        if !bin.is_file() {
            bail!("the S3 test server {} is missing: run `make setup` (scripts/setup.sh builds it)", bin.display());
        }
        // Ask the OS for a free port, then release it for the server. Another process could take
        // it in between; start() then fails with the server's message rather than hanging.
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).context("finding a free port")?.port();
        let mut server = Self { child: None, port, root: temp_dir("s3")? };
        server.spawn()?;
        Ok(server)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The directory the server stores buckets in (a bucket is a directory).
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// What [`crate::open_with_options`] needs for `s3://bucket/prefix` on this server.
    pub fn options(&self) -> Vec<(String, String)> {
        [
            ("aws_endpoint", self.endpoint()),
            ("aws_allow_http", "true".to_string()),
            ("aws_access_key_id", ACCESS_KEY.to_string()),
            ("aws_secret_access_key", SECRET_KEY.to_string()),
            ("aws_region", REGION.to_string()),
            // s3s-fs serves buckets as paths (http://host/bucket/key), not as host names.
            ("aws_virtual_hosted_style_request", "false".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// object_store cannot create buckets; s3s-fs keeps one as a directory under its root.
    pub fn create_bucket(&self, name: &str) -> Result<()> {
        let dir = self.root().join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating bucket directory {}", dir.display()))
    }

    /// Kills the server and starts it again on the same port and data directory, as a
    /// restarted or briefly unreachable store looks to a client.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }

    /// Kills the server without starting it again (until `restart`).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn spawn(&mut self) -> Result<()> {
        let bin = Self::binary();
        let mut child = Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(self.root.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().context("waiting for s3s-fs")? {
                let mut err = String::new();
                if let Some(mut stderr) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut stderr, &mut err);
                }
                bail!("s3s-fs exited ({status}) before serving on port {}: {}", self.port, err.trim());
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("s3s-fs did not listen on 127.0.0.1:{} within 20 s", self.port);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child = Some(child);
        Ok(())
    }
}

impl Drop for S3TestServer {
    fn drop(&mut self) {
        self.kill();
    }
}
