//! The operations on every kind of location (local, memory, a real S3 server on 127.0.0.1), and
//! the retry policy against a store that fails on purpose.

use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions,
    PutOptions, PutPayload, PutResult,
};

use crate::testing::{temp_dir, S3TestServer};
use crate::*;

fn quick_retries(attempts: u32) -> RetryConfig {
    RetryConfig { attempts, base_delay: Duration::from_millis(1), max_delay: Duration::from_millis(4) }
}

/// Put, get, ranges, head, list, list_dirs and delete, as every backend must do them.
fn exercise(s: &StoreUrl) {
    block_on(async {
        let body: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        let halves = vec![Bytes::copy_from_slice(&body[..4000]), Bytes::copy_from_slice(&body[4000..])];
        s.put("dir/object.bin", halves).await.unwrap();
        s.put("dir/sub/two.txt", vec![Bytes::from_static(b"hello store")]).await.unwrap();
        s.put("top.json", vec![Bytes::from_static(b"{}")]).await.unwrap();

        assert_eq!(&s.get("dir/object.bin").await.unwrap()[..], &body[..]);
        assert_eq!(&s.get_range("dir/sub/two.txt", 6..11).await.unwrap()[..], b"store");
        let ranges: Vec<Range<u64>> = vec![9000..9010, 0..3, 4990..5010, 3..3];
        let got = s.get_ranges("dir/object.bin", &ranges).await.unwrap();
        for (r, b) in ranges.iter().zip(&got) {
            assert_eq!(&b[..], &body[r.start as usize..r.end as usize], "range {r:?}");
        }
        assert_eq!(s.head("dir/object.bin").await.unwrap(), Some(10_000));
        assert_eq!(s.head("dir/missing").await.unwrap(), None);
        assert_eq!(s.get_opt("dir/missing").await.unwrap(), None);
        let err = s.get("dir/missing").await.unwrap_err();
        assert!(is_not_found(&err) && format!("{err:#}").contains("dir/missing"), "{err:#}");

        let names = |v: Vec<ObjectEntry>| v.into_iter().map(|e| (e.name, e.size)).collect::<Vec<_>>();
        assert_eq!(
            names(s.list("dir").await.unwrap()),
            [("dir/object.bin".to_string(), 10_000), ("dir/sub/two.txt".to_string(), 11)]
        );
        assert_eq!(names(s.list("").await.unwrap()).len(), 3);
        assert_eq!(s.list_dirs("").await.unwrap(), ["dir"]);
        assert_eq!(s.list_dirs("dir").await.unwrap(), ["sub"]);
        assert!(s.list("nothing/here").await.unwrap().is_empty());

        s.delete("dir/sub/two.txt").await.unwrap();
        s.delete("dir/sub/two.txt").await.unwrap(); // already gone: fine
        assert_eq!(names(s.list("dir").await.unwrap()), [("dir/object.bin".to_string(), 10_000)]);
        s.put("top.json", vec![Bytes::from_static(b"[1]")]).await.unwrap(); // replaces
        assert_eq!(&s.get("top.json").await.unwrap()[..], b"[1]");

        for bad in ["../escape", "a/../../b", "/abs", "a//b", "a\\b", ".", ""] {
            let err = s.put(bad, vec![]).await.unwrap_err();
            assert!(format!("{err}").contains("is not an object name"), "{bad}: {err}");
        }
    });
}

#[test]
fn local_paths_and_file_urls() {
    let dir = temp_dir("storage").unwrap();
    let plain = dir.path().join("a/b");
    let s = open(plain.to_str().unwrap()).unwrap();
    assert_eq!(s.local.as_deref(), Some(plain.as_path()), "a plain path is local");
    exercise(&s);
    assert!(plain.join("dir/object.bin").is_file(), "a plain path is the local directory");
    let s = open(&format!("file://{}", dir.path().join("c").display())).unwrap();
    assert!(s.local.is_some());
    exercise(&s);
    assert!(dir.path().join("c/dir/object.bin").is_file());
}

#[test]
fn memory_stores_are_shared_by_name() {
    let m = open("memory://storage-test/pre").unwrap();
    assert!(m.local.is_none());
    exercise(&m);
    let again = open("memory://storage-test/pre").unwrap();
    assert_eq!(block_on(again.head("dir/object.bin")).unwrap(), Some(10_000));
}

#[test]
fn s3_on_a_local_server() {
    let server = S3TestServer::start().unwrap();
    server.create_bucket("bucket").unwrap();
    let s = open_with_options("s3://bucket/some/prefix", server.options()).unwrap();
    exercise(&s);
    assert!(server.root().join("bucket/some/prefix/dir/object.bin").is_file());
}

#[test]
fn bad_urls_are_named() {
    let err = open("ftp://host/x").unwrap_err();
    assert!(format!("{err:#}").contains("ftp://host/x"), "{err:#}");
    let err = open("s3:///nobucket").unwrap_err();
    assert!(format!("{err:#}").contains("names no bucket"), "{err:#}");
}

#[test]
fn a_local_put_is_never_seen_half_written() {
    let dir = temp_dir("storage-atomic").unwrap();
    let s = open(dir.path().to_str().unwrap()).unwrap();
    let big = |b: u8| vec![Bytes::from(vec![b; 1 << 20]), Bytes::from(vec![b; 1 << 20])];
    block_on(s.put("f.bin", big(1))).unwrap();
    // A reader racing a writer that replaces the file sees one whole version or the other.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (path, stop) = (dir.path().join("f.bin"), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0;
            while !stop.load(Ordering::Relaxed) || reads == 0 {
                let got = std::fs::read(&path).unwrap();
                assert_eq!(got.len(), 2 << 20, "a partial file was visible");
                assert!(got.iter().all(|&b| b == got[0]), "a mix of two versions was visible");
                reads += 1;
            }
        })
    };
    for i in 0..20u8 {
        block_on(s.put("f.bin", big(i))).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    // A put that cannot finish (its name is taken by a directory) leaves no file of any name.
    std::fs::create_dir_all(dir.path().join("taken/inner")).unwrap();
    let err = block_on(s.put("taken", big(7))).unwrap_err();
    assert!(format!("{err:#}").contains("writing") && format!("{err:#}").contains("taken"), "{err:#}");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 2, "only f.bin and the directory: {left:?}");
}

/// A memory store whose reads and writes fail with a transient error `fail_first` times.
#[derive(Debug)]
struct Flaky {
    inner: InMemory,
    fail_first: u32,
    calls: AtomicU32,
}

impl Flaky {
    fn new(fail_first: u32) -> Arc<Self> {
        Arc::new(Self { inner: InMemory::new(), fail_first, calls: AtomicU32::new(0) })
    }

    fn trip(&self) -> object_store::Result<()> {
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.fail_first {
            return Err(object_store::Error::Generic { store: "Flaky", source: "connection reset by the test".into() });
        }
        Ok(())
    }
}

impl std::fmt::Display for Flaky {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Flaky")
    }
}

#[async_trait]
impl ObjectStore for Flaky {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.trip()?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        self.trip()?;
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

#[test]
fn transient_failures_are_retried_a_bounded_number_of_times() {
    let flaky = Flaky::new(3);
    let s = StoreUrl::from_store(flaky.clone(), Path::from("p"), "memory://flaky/p").with_retry(quick_retries(4));
    block_on(s.put("x", vec![Bytes::from_static(b"abc")])).unwrap(); // 3 failures, then success
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 4);
    assert_eq!(&block_on(s.get("x")).unwrap()[..], b"abc");
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 5, "no failures left: one call");

    // More failures than attempts: the last error comes back, naming the object.
    let flaky = Flaky::new(10);
    let s = StoreUrl::from_store(flaky.clone(), Path::default(), "memory://flaky").with_retry(quick_retries(3));
    let err = block_on(s.get("y")).unwrap_err();
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 3);
    let msg = format!("{err:#}");
    assert!(msg.contains("reading memory://flaky/y") && msg.contains("connection reset by the test"), "{msg}");
}

#[test]
fn permanent_failures_are_not_retried() {
    let flaky = Flaky::new(0);
    let s = StoreUrl::from_store(flaky.clone(), Path::default(), "memory://flaky").with_retry(quick_retries(5));
    let err = block_on(s.get("missing")).unwrap_err();
    assert!(is_not_found(&err), "{err:#}");
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 1, "NotFound is final");
    assert!(!Failure::Cancelled.is_transient(), "a cancelled task is not an I/O error");
    let denied = Failure::Io(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
    assert!(!denied.is_transient());
    let precondition = object_store::Error::Precondition { path: "x".into(), source: "etag".into() };
    assert!(!Failure::Store(precondition).is_transient());
    assert!(Failure::Io(std::io::Error::from(std::io::ErrorKind::TimedOut)).is_transient());
    let r = RetryConfig { attempts: 9, base_delay: Duration::from_millis(100), max_delay: Duration::from_secs(1) };
    let delays: Vec<u64> = (1..=6).map(|a| r.delay(a).as_millis() as u64).collect();
    assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
}

#[test]
fn a_briefly_stopped_s3_server_is_waited_for() {
    let mut server = S3TestServer::start().unwrap();
    server.create_bucket("bucket").unwrap();
    let s = open_with_options("s3://bucket/p", server.options()).unwrap().with_retry(RetryConfig {
        attempts: 20,
        base_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(200),
    });
    block_on(s.put("obj", vec![Bytes::from_static(b"still here")])).unwrap();
    server.kill();
    let restarter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        server.restart().unwrap();
        server
    });
    assert_eq!(&block_on(s.get("obj")).unwrap()[..], b"still here");
    let _server = restarter.join().unwrap();
}

#[test]
fn block_on_works_inside_the_shared_runtime() {
    let inner = spawn(async { block_on(async { 41 + 1 }) });
    assert_eq!(block_on(inner).unwrap(), 42);
    assert!(std::ptr::eq(runtime(), runtime()));
}
