//! What a run was made with, stamped at its start: one log line, and `run.json` in the run
//! directory (git commit, config hash, versions of bd3 and of the libraries it runs on, devices,
//! world size, host names), for `bd3 report` and for whoever compares runs later. Also the
//! terminal's progress bar.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::config::Config;
use crate::dist::Communicator;

/// The libtorch bd3 builds against: tch's build script accepts no other (Cargo.toml pins it).
pub const LIBTORCH_VERSION: &str = "2.11.0";
/// Host names longer than this are cut in `run.json`.
const HOST_NAME_BYTES: usize = 64;

#[derive(Debug, Clone, Serialize)]
pub struct RunStamp {
    pub run: String,
    pub bd3_version: String,
    pub git_commit: String,
    pub config_hash: String,
    pub libtorch: String,
    /// CUDA devices libtorch sees, and cuDNN's version when it is loaded.
    pub cuda_devices: i64,
    pub cudnn: Option<i64>,
    /// NCCL's version where bd3 is built with CUDA and the library loads.
    pub nccl: Option<String>,
    pub mpi: Option<String>,
    pub device: String,
    /// `nvidia-smi`'s name of this rank's GPU.
    pub device_name: Option<String>,
    pub world_size: usize,
    /// Every rank's host name, in rank order.
    pub hostnames: Vec<String>,
    /// Seconds since the Unix epoch.
    pub started_at: u64,
}

impl RunStamp {
    /// Collects the stamp; every rank must call it (the host names are gathered).
    pub fn collect(cfg: &Config, comm: &dyn Communicator, device: Device) -> Result<Self> {
        let hostnames = gather_hostnames(comm)?;
        let device_name = match device {
            Device::Cuda(i) => crate::flops::gpu_name(i),
            _ => None,
        };
        Ok(Self {
            run: cfg.run.name.clone(),
            bd3_version: env!("CARGO_PKG_VERSION").to_string(),
            git_commit: crate::weights::binary_commit().to_string(),
            config_hash: crate::state::config_hash(cfg)?,
            libtorch: LIBTORCH_VERSION.to_string(),
            cuda_devices: tch::Cuda::device_count(),
            cudnn: tch::Cuda::cudnn_is_available().then(tch::utils::version_cudnn),
            nccl: nccl_version(),
            mpi: ::mpi::environment::library_version()
                .ok()
                .map(|v| v.trim_matches(|c: char| c == '\0' || c.is_whitespace()).to_string()),
            device: format!("{device:?}"),
            device_name,
            world_size: comm.world_size(),
            hostnames,
            started_at: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        })
    }

    /// Logs the stamp and writes `run.json` into `run_dir`.
    pub fn write(&self, run_dir: &Path) -> Result<()> {
        tracing::info!(
            commit = %self.git_commit,
            config_hash = %self.config_hash,
            bd3 = %self.bd3_version,
            libtorch = %self.libtorch,
            nccl = ?self.nccl,
            device = %self.device,
            world = self.world_size,
            hosts = ?self.hostnames,
            "run"
        );
        let path = run_dir.join("run.json");
        std::fs::write(&path, serde_json::to_vec_pretty(self)?).with_context(|| format!("writing {}", path.display()))
    }
}

#[cfg(feature = "cuda")]
fn nccl_version() -> Option<String> {
    crate::dist::nccl::library_version().ok()
}

#[cfg(not(feature = "cuda"))]
fn nccl_version() -> Option<String> {
    None
}

/// Every rank's host name in rank order: each rank writes its name's bytes into its row of a
/// `[world, 64]` tensor of zeros, and a sum over the ranks fills every row.
fn gather_hostnames(comm: &dyn Communicator) -> Result<Vec<String>> {
    let mut name = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer.
    unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) };
    let own: Vec<u8> = name.iter().copied().take_while(|&b| b != 0).take(HOST_NAME_BYTES).collect();
    let (world, rank) = (comm.world_size(), comm.rank());
    let mut rows = vec![0f32; world * HOST_NAME_BYTES];
    for (i, &b) in own.iter().enumerate() {
        rows[rank * HOST_NAME_BYTES + i] = b as f32;
    }
    let table = Tensor::from_slice(&rows).to_kind(Kind::Float);
    comm.all_reduce(&table, crate::dist::ReduceOp::Sum)?;
    let bytes = Vec::<f32>::try_from(&table)?;
    Ok(bytes
        .chunks(HOST_NAME_BYTES)
        .map(|row| {
            let row: Vec<u8> = row.iter().map(|&b| b as u8).take_while(|&b| b != 0).collect();
            String::from_utf8_lossy(&row).into_owned()
        })
        .collect())
}

/// The progress bar being drawn, if any: log lines are written above it ([`StderrAboveProgress`]).
static ACTIVE_BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// stderr for log lines: with a progress bar on the terminal, the bar is lifted for the write
/// and redrawn below it, so logs never cut through the bar.
pub struct StderrAboveProgress;

impl Write for StderrAboveProgress {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let bar = ACTIVE_BAR.lock().map(|b| b.clone()).unwrap_or(None);
        match bar {
            Some(bar) => bar.suspend(|| std::io::stderr().write_all(bytes))?,
            None => std::io::stderr().write_all(bytes)?,
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Ends the bar: drawn once more at its final state, then the terminal goes on below it.
pub fn finish_progress_bar(bar: ProgressBar) {
    if let Ok(mut active) = ACTIVE_BAR.lock() {
        *active = None;
    }
    bar.finish();
    eprintln!();
}

/// The training progress bar: step, loss, tokens/s (in the message), elapsed time and ETA.
pub fn progress_bar(steps: u64, first_step: u64) -> ProgressBar {
    let bar = ProgressBar::new(steps);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] step {pos}/{len}  {msg}  ETA {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_position(first_step);
    bar.reset_eta();
    if let Ok(mut active) = ACTIVE_BAR.lock() {
        *active = Some(bar.clone());
    }
    bar
}
