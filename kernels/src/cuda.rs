//! Fused CUDA attention (cargo feature `cuda`): FlashAttention-2-style kernels in `csrc/flash.cu`,
//! wrapped in a libtorch `torch::autograd::Function` in `csrc/autograd.cpp` (forward saves the
//! log-sum-exp; backward computes dQ, dK, dV). Kernels run on libtorch's current CUDA stream.
//!
//! The kernels (`csrc/kernels.cuh`) use tensor cores (`mma.sync` m16n8k16); the same source runs
//! on the CPU in [`crate::emulation`], which is how they are tested without a GPU.
//!
//! Supported: CUDA tensors of dtype fp16 or bf16 (fp32 accumulation inside) with head dim 64 or
//! 128; [`crate::block_diffusion_attention`] sends everything else to the dense reference.

use std::ffi::{c_char, c_void, CStr};

use anyhow::{anyhow, ensure, Result};
use tch::{Kind, Tensor};
use torch_sys::C_tensor;

pub use crate::emulation::KernelLayout;
use crate::BlockLayout;

extern "C" {
    fn bd3_flash_attention(
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        layout: KernelLayout,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn bd3_free_message(message: *mut c_char);
    fn bd3_cuda_current_stream(device: i32, stream: *mut *mut c_void) -> *mut c_char;
    fn bd3_cuda_synchronize(device: i32) -> *mut c_char;
}

/// Whether the fused kernels handle these inputs.
pub fn supports(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let dim = q.size().last().copied();
    q.device().is_cuda()
        && matches!(q.kind(), Kind::Half | Kind::BFloat16)
        && matches!(dim, Some(64) | Some(128))
        && [k, v].iter().all(|t| t.device() == q.device() && t.kind() == q.kind())
}

/// Fused attention through the autograd Function; differentiable in q, k and v. Errors from
/// libtorch or CUDA (including calling it on unsupported inputs) come back as `Err`.
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, layout: &BlockLayout) -> Result<Tensor> {
    let desc = KernelLayout::new(layout)?;
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: the pointers are live tch tensors (at::Tensor* underneath) for the whole call; the
    // C++ side catches every exception and returns its message, or stores a new at::Tensor.
    check_message(unsafe { bd3_flash_attention(q.as_ptr(), k.as_ptr(), v.as_ptr(), desc, &mut out) })
        .map_err(|e| anyhow!("fused CUDA attention failed: {e}"))?;
    ensure!(!out.is_null(), "fused CUDA attention returned no tensor");
    // SAFETY: `out` is a heap at::Tensor we now own; tch deletes it on drop.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// `Err` with the text of an error message returned by the C++ side (which it frees).
fn check_message(message: *mut c_char) -> Result<()> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: a NUL-terminated string allocated by the C++ side, freed by it once copied.
    let text = unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned();
    unsafe { bd3_free_message(message) };
    Err(anyhow!(text))
}

/// Makes CUDA device `device` this thread's current device and returns libtorch's current
/// stream on it (a `cudaStream_t`): work enqueued there (NCCL collectives) runs in order with
/// libtorch's kernels, without synchronizing the host.
pub fn current_stream(device: usize) -> Result<*mut c_void> {
    let mut stream = std::ptr::null_mut();
    // SAFETY: plain values in; the C++ side catches every exception and returns its message.
    check_message(unsafe { bd3_cuda_current_stream(device as i32, &mut stream) })
        .map_err(|e| anyhow!("libtorch's current stream on CUDA device {device}: {e}"))?;
    Ok(stream)
}

/// Blocks until everything enqueued on libtorch's current stream of `device` has run.
pub fn synchronize(device: usize) -> Result<()> {
    // SAFETY: as in `current_stream`.
    check_message(unsafe { bd3_cuda_synchronize(device as i32) })
        .map_err(|e| anyhow!("synchronizing CUDA device {device}: {e}"))
}
