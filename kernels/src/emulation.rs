//! The tensor-core kernels of `csrc/kernels.cuh` run on the CPU (`csrc/emulate.cpp`, always built,
//! no nvcc or GPU needed): every thread of a block is a fiber, and `mma.sync`, `ldmatrix`,
//! `cp.async` and warp shuffles are emulated lane by lane with the PTX ISA's fragment layouts, so
//! tests check the kernels' arithmetic *and* their fragment indexing against the dense reference.
//! fp32 runs the arithmetic without rounding; bf16 and fp16 round where the GPU rounds (inputs, the
//! P and dS operands of the second products, outputs). Slow compared with libtorch; for tests.

use anyhow::{ensure, Context, Result};
use tch::{Device, Kind, Tensor};

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

/// Which build of the kernels to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// The kernels as nvcc compiles them.
    Exact = 0,
    /// A test-only build whose accumulator fragment mapping is deliberately wrong (rows
    /// groupID + 8·(i mod 2) instead of groupID + 8·⌊i/2⌋): the tests must catch it.
    WrongFragment = 1,
}

extern "C" {
    fn bd3_layout_classify(layout: KernelLayout, q0: i32, q1: i32, k0: i32, k1: i32) -> i32;
    fn bd3_layout_visible(layout: KernelLayout, q: i32, k: i32) -> i32;
    fn bd3_emulate_forward(
        variant: i32,
        dtype: i32,
        head_dim: i32,
        q: *const u8,
        k: *const u8,
        v: *const u8,
        out: *mut u8,
        lse: *mut f32,
        batch_heads: i32,
        layout: KernelLayout,
        scale: f32,
    ) -> i32;
    fn bd3_emulate_backward(
        variant: i32,
        dtype: i32,
        head_dim: i32,
        q: *const u8,
        k: *const u8,
        v: *const u8,
        grad_out: *const u8,
        lse: *const f32,
        delta: *const f32,
        grad_q: *mut u8,
        grad_k: *mut u8,
        grad_v: *mut u8,
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

/// `flash.h`'s dtype code of an element type the emulation runs.
fn dtype_code(kind: Kind) -> Result<i32> {
    Ok(match kind {
        Kind::Half => 0,
        Kind::BFloat16 => 1,
        Kind::Float => 2,
        k => anyhow::bail!("the kernel emulation runs fp32, bf16 and fp16, not {k:?}"),
    })
}

struct Prepared {
    tensors: [Tensor; 3],
    layout: KernelLayout,
    batch_heads: i32,
    head_dim: i32,
    dtype: i32,
    scale: f32,
}

/// Contiguous CPU copies in `kind` of `[batch, heads, len, head_dim]` inputs.
fn prepare(ts: [&Tensor; 3], layout: &BlockLayout, kind: Kind) -> Result<Prepared> {
    let tensors = ts.map(|t| t.to_device(Device::Cpu).to_kind(kind).contiguous());
    let size = tensors[0].size();
    ensure!(size.len() == 4, "the kernel emulation takes [batch, heads, len, head_dim] tensors, got {size:?}");
    ensure!(matches!(size[3], 64 | 128), "the kernels have head dims 64 and 128, not {}", size[3]);
    // The C++ side indexes by these sizes: anything else would read out of bounds.
    let (k_size, v_size) = (tensors[1].size(), tensors[2].size());
    ensure!(
        size[2] as usize == layout.query_len()
            && k_size.len() == 4
            && k_size[2] as usize == layout.key_len()
            && k_size == v_size
            && (k_size[0], k_size[1], k_size[3]) == (size[0], size[1], size[3]),
        "q {size:?}, k {k_size:?}, v {v_size:?} do not match layout {layout:?}"
    );
    Ok(Prepared {
        batch_heads: i32::try_from(size[0] * size[1])?,
        head_dim: size[3] as i32,
        dtype: dtype_code(kind)?,
        scale: 1.0 / (size[3] as f32).sqrt(),
        layout: KernelLayout::new(layout)?,
        tensors,
    })
}

fn ptr(t: &Tensor) -> *mut u8 {
    t.data_ptr() as *mut u8
}

/// Output (in `kind`) and row log-sum-exp (fp32, `[batch, heads, query_len]`) of the forward
/// kernel run on inputs rounded to `kind` (fp32, bf16 or fp16).
pub fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: &BlockLayout,
    kind: Kind,
    variant: Variant,
) -> Result<(Tensor, Tensor)> {
    let p = prepare([q, k, v], layout, kind)?;
    let [q, k, v] = &p.tensors;
    let out = q.zeros_like();
    let lse = Tensor::zeros(&q.size()[..3], (Kind::Float, Device::Cpu));
    // SAFETY: contiguous CPU tensors of the element type and shapes the kernels index, alive for
    // the call; the emulation writes only `out` and `lse`.
    let rc = unsafe {
        bd3_emulate_forward(
            variant as i32,
            p.dtype,
            p.head_dim,
            ptr(q),
            ptr(k),
            ptr(v),
            ptr(&out),
            lse.data_ptr() as *mut f32,
            p.batch_heads,
            p.layout,
            p.scale,
        )
    };
    ensure!(rc == 0, "emulated forward refused dtype {kind:?} / head dim {}", p.head_dim);
    Ok((out, lse))
}

/// dq, dk, dv (in `kind`) of the backward kernels, given the forward's output and log-sum-exp;
/// `delta = rowsum(dO ∘ O)` is computed in fp32 from the rounded tensors, as `autograd.cpp` does.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    grad_out: &Tensor,
    layout: &BlockLayout,
    kind: Kind,
    variant: Variant,
) -> Result<(Tensor, Tensor, Tensor)> {
    let p = prepare([q, k, v], layout, kind)?;
    let [q, k, v] = &p.tensors;
    let grad_out = grad_out.to_device(Device::Cpu).to_kind(kind).contiguous();
    let lse = lse.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
    ensure!(
        grad_out.size() == q.size() && out.size() == q.size() && lse.size() == q.size()[..3],
        "grad_out {:?}, out {:?} and lse {:?} must match q {:?} (lse without head_dim)",
        grad_out.size(),
        out.size(),
        lse.size(),
        q.size()
    );
    let out = out.to_device(Device::Cpu);
    let delta = (grad_out.to_kind(Kind::Float) * out.to_kind(kind).to_kind(Kind::Float))
        .sum_dim_intlist(-1, false, Kind::Float)
        .contiguous();
    let (dq, dk, dv) = (q.zeros_like(), k.zeros_like(), v.zeros_like());
    // SAFETY: as in `forward`; the emulation writes only dq, dk and dv.
    let rc = unsafe {
        bd3_emulate_backward(
            variant as i32,
            p.dtype,
            p.head_dim,
            ptr(q),
            ptr(k),
            ptr(v),
            ptr(&grad_out),
            lse.data_ptr() as *const f32,
            delta.data_ptr() as *const f32,
            ptr(&dq),
            ptr(&dk),
            ptr(&dv),
            p.batch_heads,
            p.layout,
            p.scale,
        )
    };
    ensure!(rc == 0, "emulated backward refused dtype {kind:?} / head dim {}", p.head_dim);
    Ok((dq, dk, dv))
}
