//! The device a process computes on, and the host allocator's tuning for CPU training.

use anyhow::{bail, Result};
use tch::Device;

use crate::config::DeviceSpec;

/// The libtorch device of `train.device`; CUDA is refused where none is available.
pub fn select_device(spec: DeviceSpec) -> Result<Device> {
    Ok(match spec {
        DeviceSpec::Auto => Device::cuda_if_available(),
        DeviceSpec::Cpu => Device::Cpu,
        DeviceSpec::Cuda(index) => {
            if !tch::Cuda::is_available() {
                bail!("train.device is \"cuda:{index}\" but no CUDA device is available");
            }
            Device::Cuda(index)
        }
    })
}

/// libtorch frees and re-allocates the same large CPU buffers (logits, their gradients) every
/// step; glibc serves such sizes with fresh mmaps whose pages fault in again each time. Keeping
/// freed memory in the heap instead made CPU training 1.4× faster (docs/benchmarks.md), at the
/// price of a resident set that stays at its peak. `false` restores glibc's defaults.
pub fn keep_freed_memory_for_reuse(keep: bool) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters; it is safe to call at any time.
    unsafe {
        let (mmap_max, trim_threshold) = if keep { (0, i32::MAX) } else { (65_536, 128 * 1024) };
        libc::mallopt(libc::M_MMAP_MAX, mmap_max);
        libc::mallopt(libc::M_TRIM_THRESHOLD, trim_threshold);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = keep;
}
