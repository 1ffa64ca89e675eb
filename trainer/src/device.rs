//! The device a process computes on, and the host allocator's tuning for CPU training.

use anyhow::{bail, Result};
use tch::Device;

use crate::config::DeviceSpec;
use crate::dist::Placement;

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

/// The device of a rank that the launcher placed at `placement` on a node with `gpus` visible
/// CUDA devices. One process: `train.device` as written ("cuda:N" is GPU N). Several processes:
/// "cuda" (and "auto" where GPUs exist) is the GPU of the local rank; a pinned "cuda:N" and more
/// local ranks than GPUs are errors at start, not a hang in the first collective.
pub fn rank_device(spec: DeviceSpec, placement: &Placement, gpus: usize) -> Result<Device> {
    let visible = || std::env::var("CUDA_VISIBLE_DEVICES").map_or_else(|_| "unset".into(), |v| format!("{v:?}"));
    let (local, world) = (placement.local_rank, placement.world_size);
    let wants_cuda = match spec {
        DeviceSpec::Cpu => return Ok(Device::Cpu),
        DeviceSpec::Auto => gpus > 0,
        DeviceSpec::Cuda(_) => true,
    };
    if !wants_cuda {
        return Ok(Device::Cpu);
    }
    if gpus == 0 {
        bail!(
            "train.device is \"{}\" but no CUDA device is visible (CUDA_VISIBLE_DEVICES {})",
            String::from(spec),
            visible()
        );
    }
    if world == 1 {
        let index = match spec {
            DeviceSpec::Cuda(index) => index,
            _ => 0,
        };
        if index >= gpus {
            bail!("train.device is \"cuda:{index}\" but this machine shows {gpus} CUDA device(s) (CUDA_VISIBLE_DEVICES {})", visible());
        }
        return Ok(Device::Cuda(index));
    }
    if let DeviceSpec::Cuda(index) = spec {
        if index != 0 {
            bail!(
                "train.device = \"cuda:{index}\" pins one GPU, which only a single process can use; with {world} \
                 processes set \"cuda\": each local rank then takes its own GPU"
            );
        }
    }
    if local >= gpus {
        bail!(
            "local rank {local} (rank {} of {world}) has no GPU: this node shows {gpus} CUDA device(s) \
             (CUDA_VISIBLE_DEVICES {}) and runs more ranks than that; start at most {gpus} ranks per node, \
             or train on the CPU (train.device = \"cpu\")",
            placement.rank,
            visible()
        );
    }
    Ok(Device::Cuda(local))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rank: usize, world_size: usize, local_rank: usize) -> Placement {
        Placement { rank, world_size, local_rank }
    }

    #[test]
    fn each_local_rank_takes_its_own_gpu() {
        let cuda = DeviceSpec::Cuda(0);
        assert_eq!(rank_device(cuda, &at(5, 8, 1), 4).unwrap(), Device::Cuda(1));
        assert_eq!(rank_device(DeviceSpec::Auto, &at(3, 8, 3), 4).unwrap(), Device::Cuda(3));
        assert_eq!(rank_device(DeviceSpec::Auto, &at(3, 8, 3), 0).unwrap(), Device::Cpu);
        assert_eq!(rank_device(DeviceSpec::Cpu, &at(3, 8, 3), 4).unwrap(), Device::Cpu);
        // One process honours cuda:N.
        assert_eq!(rank_device(DeviceSpec::Cuda(2), &Placement::SINGLE, 4).unwrap(), Device::Cuda(2));
    }

    #[test]
    fn more_local_ranks_than_gpus_is_a_clear_error() {
        let err = rank_device(DeviceSpec::Cuda(0), &at(6, 8, 2), 2).unwrap_err().to_string();
        assert!(err.contains("local rank 2 (rank 6 of 8) has no GPU") && err.contains("shows 2 CUDA"), "{err}");
        let err = rank_device(DeviceSpec::Cuda(3), &at(0, 2, 0), 4).unwrap_err().to_string();
        assert!(err.contains("\"cuda:3\" pins one GPU"), "{err}");
        let err = rank_device(DeviceSpec::Cuda(4), &Placement::SINGLE, 4).unwrap_err().to_string();
        assert!(err.contains("shows 4 CUDA device(s)"), "{err}");
        let err = rank_device(DeviceSpec::Cuda(0), &at(0, 2, 0), 0).unwrap_err().to_string();
        assert!(err.contains("no CUDA device is visible"), "{err}");
    }
}
