//! Fused CUDA attention (cargo feature `cuda`): FlashAttention-2-style kernels in `csrc/flash.cu`,
//! wrapped in a libtorch `torch::autograd::Function` in `csrc/autograd.cpp` (forward saves the
//! log-sum-exp; backward computes dQ, dK, dV). Kernels run on libtorch's current CUDA stream.
//!
//! Supported: CUDA tensors of dtype fp16 or bf16 (fp32 accumulation inside) with head dim 64 or
//! 128; [`crate::block_diffusion_attention`] sends everything else to the dense reference.

use std::ffi::{c_char, c_void, CStr};

use anyhow::{anyhow, ensure, Context, Result};
use tch::{Kind, Tensor};
use torch_sys::C_tensor;

use crate::{BlockLayout, TileKind};

/// A [`BlockLayout`] as the kernels see it (`Bd3Layout` in `csrc/layout.cuh`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelLayout {
    kind: i32,
    n: i32,
    block: i32,
    sq: i32,
    sk: i32,
}

const TWO_STREAM: i32 = 0;
const BLOCK_CAUSAL: i32 = 1;
const ALL_VISIBLE: i32 = 2;

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
    fn bd3_layout_classify(layout: KernelLayout, q0: i32, q1: i32, k0: i32, k1: i32) -> i32;
    fn bd3_layout_visible(layout: KernelLayout, q: i32, k: i32) -> i32;
    fn bd3_emulate_forward(
        head_dim: i32,
        q: *const f32,
        k: *const f32,
        v: *const f32,
        out: *mut f32,
        lse: *mut f32,
        batch_heads: i32,
        layout: KernelLayout,
        scale: f32,
    ) -> i32;
    fn bd3_emulate_backward(
        head_dim: i32,
        q: *const f32,
        k: *const f32,
        v: *const f32,
        grad_out: *const f32,
        lse: *const f32,
        delta: *const f32,
        grad_q: *mut f32,
        grad_k: *mut f32,
        grad_v: *mut f32,
        batch_heads: i32,
        layout: KernelLayout,
        scale: f32,
    ) -> i32;
}

impl KernelLayout {
    /// Encodes `layout`; the kernels index with 32-bit integers.
    pub fn new(layout: &BlockLayout) -> Result<Self> {
        let int =
            |x: usize| i32::try_from(x).with_context(|| format!("layout {layout:?} is too long for the CUDA kernels"));
        let (kind, n, block) = match *layout {
            BlockLayout::TwoStream { seq_len, block_size } => (TWO_STREAM, seq_len, block_size),
            BlockLayout::BlockCausal { seq_len, block_size } => (BLOCK_CAUSAL, seq_len, block_size),
            BlockLayout::Causal { seq_len } => (BLOCK_CAUSAL, seq_len, 1),
            BlockLayout::Decode { .. } => (ALL_VISIBLE, layout.query_len(), 1),
        };
        Ok(Self { kind, n: int(n)?, block: int(block)?, sq: int(layout.query_len())?, sk: int(layout.key_len())? })
    }

    /// The tile classification as compiled into the kernels (for tests against [`BlockLayout::classify`]).
    pub fn classify(&self, queries: std::ops::Range<usize>, keys: std::ops::Range<usize>) -> TileKind {
        let c = |x: usize| x as i32;
        // SAFETY: a pure host function of plain integers.
        match unsafe { bd3_layout_classify(*self, c(queries.start), c(queries.end), c(keys.start), c(keys.end)) } {
            0 => TileKind::Empty,
            1 => TileKind::Full,
            _ => TileKind::Partial,
        }
    }

    /// The element rule as compiled into the kernels.
    pub fn visible(&self, q: usize, k: usize) -> bool {
        // SAFETY: a pure host function of plain integers.
        unsafe { bd3_layout_visible(*self, q as i32, k as i32) != 0 }
    }
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

/// The CUDA kernels' code run on CPU threads (`csrc/emulate.cpp`), fp32: lets tests check the
/// kernels' arithmetic without a GPU. Slow; small problems only.
pub mod emulation {
    use super::*;

    fn f32_ptr(t: &Tensor) -> *mut f32 {
        t.data_ptr() as *mut f32
    }

    fn prepare(ts: [&Tensor; 3], layout: &BlockLayout) -> Result<([Tensor; 3], KernelLayout, i32, f32)> {
        let [q, k, v] = ts.map(|t| t.to_kind(Kind::Float).contiguous());
        ensure!(q.device() == tch::Device::Cpu && q.dim() == 4, "emulation takes CPU [batch, heads, len, dim] tensors");
        let size = q.size();
        ensure!(matches!(size[3], 64 | 128), "the kernels have head dims 64 and 128, not {}", size[3]);
        let batch_heads = i32::try_from(size[0] * size[1])?;
        Ok(([q, k, v], KernelLayout::new(layout)?, batch_heads, 1.0 / (size[3] as f32).sqrt()))
    }

    /// Output and row log-sum-exp `[batch, heads, query_len]` of the forward kernel.
    pub fn forward(q: &Tensor, k: &Tensor, v: &Tensor, layout: &BlockLayout) -> Result<(Tensor, Tensor)> {
        let ([q, k, v], desc, bh, scale) = prepare([q, k, v], layout)?;
        let out = q.empty_like();
        let lse = Tensor::empty(&q.size()[..3], (Kind::Float, tch::Device::Cpu));
        let d = q.size()[3] as i32;
        // SAFETY: contiguous fp32 CPU tensors of the shapes the kernels index, alive for the call.
        let rc = unsafe {
            bd3_emulate_forward(d, f32_ptr(&q), f32_ptr(&k), f32_ptr(&v), f32_ptr(&out), f32_ptr(&lse), bh, desc, scale)
        };
        ensure!(rc == 0, "emulated forward failed");
        Ok((out, lse))
    }

    /// dq, dk, dv of the backward kernels, given the forward's output and log-sum-exp.
    pub fn backward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        lse: &Tensor,
        grad_out: &Tensor,
        layout: &BlockLayout,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let ([q, k, v], desc, bh, scale) = prepare([q, k, v], layout)?;
        let grad_out = grad_out.to_kind(Kind::Float).contiguous();
        let lse = lse.contiguous();
        // delta_i = Σ_d dO_id O_id, as autograd.cpp computes it.
        let delta = (&grad_out * out).sum_dim_intlist(-1, false, Kind::Float).contiguous();
        let (dq, dk, dv) = (q.zeros_like(), k.zeros_like(), v.zeros_like());
        let d = q.size()[3] as i32;
        // SAFETY: as in `forward`.
        let rc = unsafe {
            bd3_emulate_backward(
                d,
                f32_ptr(&q),
                f32_ptr(&k),
                f32_ptr(&v),
                f32_ptr(&grad_out),
                f32_ptr(&lse),
                f32_ptr(&delta),
                f32_ptr(&dq),
                f32_ptr(&dk),
                f32_ptr(&dv),
                bh,
                desc,
                scale,
            )
        };
        ensure!(rc == 0, "emulated backward failed");
        Ok((dq, dk, dv))
    }
}
