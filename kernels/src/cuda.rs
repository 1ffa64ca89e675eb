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
    fn bd3_cuda_pool_stream(device: i32, stream: *mut *mut c_void) -> *mut c_char;
    fn bd3_cuda_event_create(device: i32, event: *mut *mut c_void) -> *mut c_char;
    fn bd3_cuda_event_record(event: *mut c_void, stream: *mut c_void) -> *mut c_char;
    fn bd3_cuda_stream_wait_event(stream: *mut c_void, event: *mut c_void) -> *mut c_char;
    fn bd3_cuda_event_query(device: i32, event: *mut c_void, done: *mut i32) -> *mut c_char;
    fn bd3_cuda_event_destroy(device: i32, event: *mut c_void);
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

/// A `cudaStream_t`. Streams are safe to use from any thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stream(pub *mut c_void);
// SAFETY: a CUDA stream handle may be used from any host thread.
unsafe impl Send for Stream {}
// SAFETY: as above.
unsafe impl Sync for Stream {}

/// A stream of libtorch's pool on `device` (high priority, not synchronizing with the default
/// stream): work there runs beside libtorch's kernels, ordered with them only by [`Event`]s.
pub fn pool_stream(device: usize) -> Result<Stream> {
    let mut stream = std::ptr::null_mut();
    // SAFETY: as in `current_stream`.
    check_message(unsafe { bd3_cuda_pool_stream(device as i32, &mut stream) })
        .map_err(|e| anyhow!("a pool stream on CUDA device {device}: {e}"))?;
    Ok(Stream(stream))
}

/// A CUDA event (no timing): a point in a stream that other streams can wait for on the device,
/// and the host can poll without blocking.
#[derive(Debug)]
pub struct Event {
    event: *mut c_void,
    device: usize,
}
// SAFETY: CUDA events may be recorded, waited on and queried from any host thread.
unsafe impl Send for Event {}
// SAFETY: as above.
unsafe impl Sync for Event {}

impl Event {
    pub fn new(device: usize) -> Result<Self> {
        let mut event = std::ptr::null_mut();
        // SAFETY: as in `current_stream`.
        check_message(unsafe { bd3_cuda_event_create(device as i32, &mut event) })
            .map_err(|e| anyhow!("a CUDA event on device {device}: {e}"))?;
        Ok(Self { event, device })
    }

    /// An event recorded on `stream` now.
    pub fn recorded(device: usize, stream: Stream) -> Result<Self> {
        let event = Self::new(device)?;
        event.record(stream)?;
        Ok(event)
    }

    /// Moves the event to the point `stream` reaches with the work enqueued on it so far.
    pub fn record(&self, stream: Stream) -> Result<()> {
        // SAFETY: a live event and stream; the C++ side catches every exception.
        check_message(unsafe { bd3_cuda_event_record(self.event, stream.0) }).map_err(|e| anyhow!("{e}"))
    }

    /// Makes the work enqueued on `stream` after this call wait, on the device, for the event.
    pub fn block(&self, stream: Stream) -> Result<()> {
        // SAFETY: as in `record`.
        check_message(unsafe { bd3_cuda_stream_wait_event(stream.0, self.event) }).map_err(|e| anyhow!("{e}"))
    }

    /// Whether the device has passed the event (never blocks the host; callable from a thread
    /// that never chose a device).
    pub fn is_done(&self) -> Result<bool> {
        let mut done = 0;
        // SAFETY: as in `record`; writes one int.
        check_message(unsafe { bd3_cuda_event_query(self.device as i32, self.event, &mut done) })
            .map_err(|e| anyhow!("{e}"))?;
        Ok(done != 0)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created by bd3_cuda_event_create, destroyed once. CUDA defers the release of
        // an event that is still pending.
        unsafe { bd3_cuda_event_destroy(self.device as i32, self.event) };
    }
}
