//! Live metrics for Prometheus: every rank serves `GET /metrics` in the text exposition format
//! on `metrics.listen` (port + local rank), labelled with the run name and the rank.
//!
//! The training loop only sets gauges (atomic stores); a scrape is answered by a thread of
//! its own, so a slow or stuck scraper never delays a step.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use prometheus::core::Collector;
use prometheus::{Encoder, Gauge, IntCounter, IntGauge, Opts, Registry, TextEncoder};

/// The address local rank `local_rank` serves on, from `metrics.listen` (`host:port`, the port
/// offset by the local rank so that the ranks of one node do not collide; port 0 stays 0, a
/// free port); `None` for an empty value (no endpoint).
pub fn listen_address(spec: &str, local_rank: usize) -> Result<Option<SocketAddr>> {
    if spec.is_empty() {
        return Ok(None);
    }
    let Ok(mut addr) = spec.parse::<SocketAddr>() else {
        bail!("metrics.listen ({spec:?}): expected an IP address and port such as \"127.0.0.1:9400\", or \"\" for no endpoint")
    };
    if addr.port() != 0 {
        let port = u16::try_from(addr.port() as usize + local_rank).ok().with_context(|| {
            format!("metrics.listen ({spec:?}): port {} + local rank {local_rank} is above 65535", addr.port())
        })?;
        addr.set_port(port);
    }
    Ok(Some(addr))
}

/// The gauges of one rank, and the endpoint that serves them.
pub struct Telemetry {
    pub step: IntGauge,
    pub loss: Gauge,
    pub learning_rate: Gauge,
    pub grad_norm: Gauge,
    pub tokens_per_second: Gauge,
    pub step_seconds: Gauge,
    pub data_wait_seconds: Gauge,
    pub allreduce_seconds: Gauge,
    pub model_flops_per_second: Gauge,
    pub mfu: Gauge,
    pub tokens: IntCounter,
    pub skipped_steps: IntCounter,
    pub checkpoint_snapshot_seconds: Gauge,
    pub checkpoint_write_seconds: Gauge,
    pub checkpoint_bytes: IntGauge,
    pub checkpoint_step: IntGauge,
    pub valid_nelbo: Gauge,
    pub clip_beta: Gauge,
    pub clip_omega: Gauge,
    server: Option<Server>,
}

impl Telemetry {
    /// The gauges, served on `listen` (see [`listen_address`]) unless it is empty. A port in
    /// use is an error that names it. `cuda` adds the GPU memory this process holds.
    pub fn start(listen: &str, run: &str, rank: usize, local_rank: usize, cuda: bool) -> Result<Self> {
        let labels = [("run".to_string(), run.to_string()), ("rank".to_string(), rank.to_string())];
        let registry = Registry::new_custom(Some("bd3".into()), Some(labels.into_iter().collect()))?;
        let g = |name: &str, help: &str| registered(&registry, Gauge::with_opts(Opts::new(name, help)));
        let ig = |name: &str, help: &str| registered(&registry, IntGauge::with_opts(Opts::new(name, help)));
        let counter = |name: &str, help: &str| registered(&registry, IntCounter::with_opts(Opts::new(name, help)));
        let resident = ig("resident_memory_bytes", "Resident set size of this process (read at each scrape)")?;
        let cuda_memory = cuda
            .then(|| {
                ig("cuda_memory_bytes", "GPU memory this process holds, as nvidia-smi reports it (read at each scrape)")
            })
            .transpose()?;
        let mut telemetry = Self {
            step: ig("step", "Optimizer steps completed")?,
            loss: g("loss", "Training loss of the last step (mean over the global batch)")?,
            learning_rate: g("learning_rate", "Learning rate of the last step")?,
            grad_norm: g("grad_norm", "Global gradient norm of the last step, before clipping")?,
            tokens_per_second: g(
                "tokens_per_second",
                "Training tokens per second of the whole job, since the last log",
            )?,
            step_seconds: g("step_seconds", "Wall-clock seconds of the last step")?,
            data_wait_seconds: g("data_wait_seconds", "Seconds the last step waited for its batches")?,
            allreduce_seconds: g("allreduce_seconds", "Seconds the last step spent reducing gradients across ranks")?,
            model_flops_per_second: g("model_flops_per_second", "Model FLOPs per second of this rank")?,
            mfu: g("mfu", "Model FLOPs utilization of this rank (0 to 1; 0 where the device's peak is unknown)")?,
            tokens: counter("tokens_total", "Training tokens of the whole job since this process started")?,
            skipped_steps: counter("skipped_steps_total", "Steps skipped as diverged (train.on_nonfinite = \"skip\")")?,
            checkpoint_snapshot_seconds: g(
                "checkpoint_snapshot_seconds",
                "Seconds the last checkpoint blocked training (copying the state to host memory)",
            )?,
            checkpoint_write_seconds: g(
                "checkpoint_write_seconds",
                "Seconds the last checkpoint took to write and commit",
            )?,
            checkpoint_bytes: ig("checkpoint_bytes", "Bytes this rank wrote for the last checkpoint")?,
            checkpoint_step: ig("checkpoint_step", "Step of the last checkpoint this rank finished writing")?,
            valid_nelbo: g("valid_nelbo", "Validation NELBO (nats per token) with the EMA weights")?,
            clip_beta: g("clip_beta", "Lower end of the masking-rate interval the run trains with")?,
            clip_omega: g("clip_omega", "Upper end of the masking-rate interval the run trains with")?,
            server: None,
        };
        if let Some(addr) = listen_address(listen, local_rank)? {
            let probes = Probes { resident, cuda_memory };
            telemetry.server = Some(Server::start(addr, registry, probes, local_rank)?);
        }
        Ok(telemetry)
    }

    /// Where the endpoint listens (the port chosen when `metrics.listen` asked for port 0).
    pub fn address(&self) -> Option<SocketAddr> {
        self.server.as_ref().map(|s| s.addr)
    }
}

/// `metric`, registered in `registry` (which keeps a handle; the caller sets the other).
fn registered<M: Collector + Clone + 'static>(registry: &Registry, metric: prometheus::Result<M>) -> Result<M> {
    let metric = metric?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

/// Gauges read fresh at each scrape, in the server's thread.
struct Probes {
    resident: IntGauge,
    cuda_memory: Option<IntGauge>,
}

impl Probes {
    fn read(&self) {
        self.resident.set(resident_memory_bytes());
        if let Some(gauge) = &self.cuda_memory {
            if let Some(bytes) = cuda_memory_bytes() {
                gauge.set(bytes);
            }
        }
    }
}

/// The GPU memory this process holds, from `nvidia-smi`'s list of compute processes.
fn cuda_memory_bytes() -> Option<i64> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"])
        .output()
        .ok()?;
    out.status.success().then(|| used_mib_of(&String::from_utf8_lossy(&out.stdout), std::process::id()) << 20)
}

/// The MiB `nvidia-smi --query-compute-apps=pid,used_memory` lists for `pid` (summed over GPUs).
fn used_mib_of(listing: &str, pid: u32) -> i64 {
    listing
        .lines()
        .filter_map(|line| line.split_once(','))
        .filter(|(p, _)| p.trim().parse() == Ok(pid))
        .filter_map(|(_, mib)| mib.trim().parse::<i64>().ok())
        .sum()
}

/// The thread that answers scrapes; stopped and joined on drop.
struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(addr: SocketAddr, registry: Registry, probes: Probes, local_rank: usize) -> Result<Self> {
        let listener = TcpListener::bind(addr).map_err(|e| {
            anyhow::anyhow!(
                "metrics.listen: cannot serve Prometheus metrics on {addr} (local rank {local_rank}): {e}; \
                 choose a free port with metrics.listen, or set it to \"\" for no endpoint"
            )
        })?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("bd3-metrics".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if flag.load(Ordering::Acquire) {
                        break;
                    }
                    if let Ok(stream) = stream {
                        probes.read();
                        // A scraper that misbehaves costs this thread a timeout, never a step.
                        let _ = answer(stream, &registry);
                    }
                }
            })
            .context("starting the metrics thread")?;
        tracing::info!(%addr, "serving Prometheus metrics at http://{addr}/metrics");
        Ok(Self { addr, stop, thread: Some(thread) })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wakes the accept loop, which then sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One HTTP/1.1 exchange: `GET /metrics` gets the text format, anything else a 404.
fn answer(mut stream: TcpStream, registry: &Registry) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // The headers are read and ignored (a client waits for the server to take them).
    let mut header = String::new();
    while reader.read_line(&mut header)? > 2 {
        header.clear();
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("");
    let (status, content_type, body) = if request_line.starts_with("GET ") && path == "/metrics" {
        let mut body = Vec::new();
        let encoder = TextEncoder::new();
        encoder.encode(&registry.gather(), &mut body).map_err(std::io::Error::other)?;
        ("200 OK", encoder.format_type().to_string(), body)
    } else {
        ("404 Not Found", "text/plain".to_string(), b"bd3 serves /metrics\n".to_vec())
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(&body)?;
    stream.flush()
}

/// This process's resident set size in bytes (Linux `/proc/self/statm`; 0 elsewhere).
pub fn resident_memory_bytes() -> i64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<i64>().ok()))
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_follow_the_local_rank() {
        assert_eq!(listen_address("", 3).unwrap(), None);
        assert_eq!(listen_address("127.0.0.1:9400", 0).unwrap(), Some("127.0.0.1:9400".parse().unwrap()));
        assert_eq!(listen_address("127.0.0.1:9400", 3).unwrap(), Some("127.0.0.1:9403".parse().unwrap()));
        assert_eq!(listen_address("127.0.0.1:0", 3).unwrap(), Some("127.0.0.1:0".parse().unwrap()));
        let err = listen_address("localhost", 0).unwrap_err().to_string();
        assert!(err.contains("metrics.listen") && err.contains("expected"), "{err}");
        assert!(listen_address("127.0.0.1:65535", 1).unwrap_err().to_string().contains("above 65535"));
    }

    #[test]
    fn gpu_memory_is_this_process_s_line() {
        let listing = "4242, 1200\n77, 900\n4242, 300\n";
        assert_eq!(used_mib_of(listing, 4242), 1500);
        assert_eq!(used_mib_of(listing, 5), 0);
        assert_eq!(used_mib_of("No running processes found\n", 4242), 0);
    }

    #[test]
    fn a_port_in_use_is_named() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let err = Telemetry::start(&addr, "r", 0, 0, false).err().expect("the port is taken").to_string();
        assert!(err.contains(&addr) && err.contains("metrics.listen"), "{err}");
    }

    #[test]
    fn scrapes_return_the_gauges_in_text_format() {
        let t = Telemetry::start("127.0.0.1:0", "run-a", 1, 0, false).unwrap();
        t.step.set(7);
        t.loss.set(2.5);
        let addr = t.address().unwrap();
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut response = String::new();
        std::io::Read::read_to_string(&mut stream, &mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        // The labels' order is the registry's (unspecified); both must be there.
        let sample = |name: &str| {
            let line =
                response.lines().find(|l| l.starts_with(&format!("{name}{{"))).unwrap_or_else(|| panic!("{response}"));
            assert!(line.contains("rank=\"1\"") && line.contains("run=\"run-a\""), "{line}");
            line.rsplit_once(' ').unwrap().1.to_string()
        };
        assert_eq!(sample("bd3_step"), "7");
        assert_eq!(sample("bd3_loss"), "2.5");
        assert!(response.contains("# TYPE bd3_resident_memory_bytes gauge"), "{response}");
        drop(t);
        assert!(TcpStream::connect(addr).is_err(), "the endpoint closes with the run");
    }
}
