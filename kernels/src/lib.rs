//! Block-diffusion attention.
//!
//! The model never builds attention masks itself: it describes *which* attention it needs with a
//! [`BlockLayout`] and calls [`block_diffusion_attention`]. Behind the entry point:
//! * [`sparse_attention`] (module `sparse`), the default: block-sparse attention that computes
//!   only the non-empty (query tile, key tile) pairs the layout classifies analytically (`tiles`);
//! * with the cargo feature `cuda`, fused FlashAttention-2-style kernels on tensor cores (module
//!   `cuda`) for bf16/fp16 CUDA tensors with head dim 64 or 128, whose code is also run on the CPU
//!   by the tests (module `emulation`);
//! * [`dense_attention`], the reference every path is tested against: scaled dot-product attention
//!   with the full boolean mask generated from the layout.
//!
//! [`attention`] takes the choice explicitly ([`Backend`], `model.attention` in the config).

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod emulation;
pub mod sparse;
pub mod tiles;

pub use sparse::{sparse_attention, sparse_attention_with_tile};
pub use tiles::{Rule, TileKind};

/// Which attention pattern a forward pass needs. Everything about the mask follows from the
/// sequence length `L` and the block size `L′` (docs/algorithm.md §2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockLayout {
    /// Training and evaluation input `x_t ⊕ x_0` of length 2L: noisy blocks attend bidirectionally
    /// inside their block and to the clean copies of strictly earlier blocks; the clean stream is
    /// block-causal and never sees noisy tokens.
    TwoStream { seq_len: usize, block_size: usize },
    /// One stream of `seq_len` tokens, block-causal with blocks of `block_size`: bidirectional
    /// inside a block, causal across blocks. `block_size == seq_len` is plain bidirectional
    /// attention (MDLM); `block_size == 1` is causal.
    BlockCausal { seq_len: usize, block_size: usize },
    /// Token-causal attention (the AR model).
    Causal { seq_len: usize },
    /// One block of `block_len` queries against `prefix_len` cached clean keys followed by the
    /// block's own keys: every key is visible, no mask is needed. `position` is the RoPE position
    /// of the block's first token (cached keys keep the positions they were rotated with, so
    /// after a sliding window drops old keys it is larger than `prefix_len`).
    Decode { prefix_len: usize, block_len: usize, position: usize },
}

impl BlockLayout {
    /// A two-stream (x_t ⊕ x_0) layout; `block_size` must divide `seq_len`.
    pub fn two_stream(seq_len: usize, block_size: usize) -> Result<Self> {
        check_blocks(seq_len, block_size)?;
        Ok(Self::TwoStream { seq_len, block_size })
    }

    /// A single-stream block-causal layout; `block_size` must divide `seq_len`.
    pub fn block_causal(seq_len: usize, block_size: usize) -> Result<Self> {
        check_blocks(seq_len, block_size)?;
        Ok(Self::BlockCausal { seq_len, block_size })
    }

    /// Number of query positions.
    pub fn query_len(&self) -> usize {
        match *self {
            Self::TwoStream { seq_len, .. } => 2 * seq_len,
            Self::BlockCausal { seq_len, .. } | Self::Causal { seq_len } => seq_len,
            Self::Decode { block_len, .. } => block_len,
        }
    }

    /// Number of key positions.
    pub fn key_len(&self) -> usize {
        match *self {
            Self::Decode { prefix_len, block_len, .. } => prefix_len + block_len,
            _ => self.query_len(),
        }
    }

    /// RoPE position of every query token. In the two-stream layout the noisy token i and the
    /// clean token i share position i (docs/algorithm.md §2.3), so the positions are 0..L twice.
    pub fn query_positions(&self) -> Vec<i64> {
        match *self {
            Self::TwoStream { seq_len, .. } => (0..seq_len as i64).chain(0..seq_len as i64).collect(),
            Self::BlockCausal { seq_len, .. } | Self::Causal { seq_len } => (0..seq_len as i64).collect(),
            Self::Decode { block_len, position, .. } => (position as i64..(position + block_len) as i64).collect(),
        }
    }

    /// Whether any key is hidden from any query (Decode and bidirectional layouts need no mask).
    pub fn needs_mask(&self) -> bool {
        match *self {
            Self::Decode { .. } => false,
            Self::BlockCausal { seq_len, block_size } => block_size < seq_len,
            _ => true,
        }
    }

    /// The dense boolean mask `[query_len, key_len]` (true = may attend), built with tensor
    /// arithmetic from the layout. Only the dense reference path uses it.
    pub fn dense_mask(&self, device: Device) -> Tensor {
        let opts = (Kind::Int64, device);
        match *self {
            Self::TwoStream { seq_len, block_size } => {
                let n = seq_len as i64;
                let idx = Tensor::arange(2 * n, opts);
                let half = idx.ge(n).to_kind(Kind::Int64); // 0 = noisy x_t, 1 = clean x_0
                let blk = (&idx - &half * n).divide_scalar_mode(block_size as i64, "floor");
                let (hq, hk) = (half.unsqueeze(1), half.unsqueeze(0));
                let (bq, bk) = (blk.unsqueeze(1), blk.unsqueeze(0));
                let block_diagonal = bq.eq_tensor(&bk).logical_and(&hq.eq_tensor(&hk));
                let offset_block_causal = hq.eq(0).logical_and(&hk.eq(1)).logical_and(&bk.lt_tensor(&bq));
                let block_causal = hq.eq(1).logical_and(&hk.eq(1)).logical_and(&bk.le_tensor(&bq));
                block_diagonal.logical_or(&offset_block_causal).logical_or(&block_causal)
            }
            Self::BlockCausal { seq_len, block_size } => {
                let blk = Tensor::arange(seq_len as i64, opts).divide_scalar_mode(block_size as i64, "floor");
                blk.unsqueeze(0).le_tensor(&blk.unsqueeze(1))
            }
            Self::Causal { seq_len } => {
                let idx = Tensor::arange(seq_len as i64, opts);
                idx.unsqueeze(0).le_tensor(&idx.unsqueeze(1))
            }
            Self::Decode { prefix_len, block_len, .. } => {
                Tensor::ones([block_len as i64, (prefix_len + block_len) as i64], (Kind::Bool, device))
            }
        }
    }
}

fn check_blocks(seq_len: usize, block_size: usize) -> Result<()> {
    ensure!(seq_len > 0, "sequence length must be positive");
    ensure!(
        block_size > 0 && seq_len % block_size == 0,
        "block size {block_size} must be positive and divide the sequence length {seq_len}"
    );
    Ok(())
}

/// Which implementation computes the attention (`model.attention` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// Per device, the backend `docs/benchmarks.md` records as fastest: `sdpa-tiles` on CPU
    /// (2.7–2.9× dense there); on CUDA nothing is recorded yet, so the fused kernels where they
    /// support the inputs, else `dense`.
    #[default]
    Auto,
    /// The fused tensor-core kernels (feature `cuda`; CUDA tensors, fp16/bf16, head dim 64 or 128).
    Fused,
    /// libtorch SDPA over the non-empty tiles only ([`sparse_attention`]), on any device: full
    /// tiles reach libtorch's flash/efficient kernels on a GPU.
    SdpaTiles,
    /// SDPA with the full boolean mask ([`dense_attention`]), the reference.
    Dense,
}

impl Backend {
    /// The name `model.attention` takes (the serde name).
    pub fn name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Fused => "fused",
            Backend::SdpaTiles => "sdpa-tiles",
            Backend::Dense => "dense",
        }
    }

    /// The concrete backend `Auto` means for these inputs (others are returned as they are).
    pub fn resolve(self, q: &Tensor, k: &Tensor, v: &Tensor) -> Backend {
        match self {
            Backend::Auto if q.device() == Device::Cpu => Backend::SdpaTiles,
            Backend::Auto if fused_supports(q, k, v) => Backend::Fused,
            Backend::Auto => Backend::Dense,
            other => other,
        }
    }
}

fn fused_supports(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    return cuda::supports(q, k, v);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, k, v);
        false
    }
}

/// The attention entry point with the default backend ([`Backend::Auto`]): `q`, `k`, `v` are
/// `[batch, heads, len, head_dim]` (post-RoPE); returns `[batch, heads, query_len, head_dim]`.
/// Scale 1/√head_dim, no dropout.
pub fn block_diffusion_attention(q: &Tensor, k: &Tensor, v: &Tensor, layout: &BlockLayout) -> Result<Tensor> {
    attention(Backend::Auto, q, k, v, layout)
}

/// The attention of `layout` computed by `backend`. `Fused` on inputs the fused kernels do not
/// support (CPU tensors, fp32, other head dims, a build without `cuda`) is an error naming why.
pub fn attention(backend: Backend, q: &Tensor, k: &Tensor, v: &Tensor, layout: &BlockLayout) -> Result<Tensor> {
    check_shapes(q, k, v, layout)?;
    match backend.resolve(q, k, v) {
        Backend::SdpaTiles => sparse_attention(q, k, v, layout),
        Backend::Dense => dense_attention(q, k, v, layout),
        Backend::Fused if fused_supports(q, k, v) => {
            #[cfg(feature = "cuda")]
            return cuda::flash_attention(q, k, v, layout);
            #[cfg(not(feature = "cuda"))]
            unreachable!("fused_supports is false without the cuda feature")
        }
        _ => bail!(
            "attention backend \"fused\" needs a build with the cargo feature `cuda` and CUDA tensors of \
             fp16 or bf16 with head dim 64 or 128; got {:?} {:?} with head dim {} (use \"auto\", \
             \"sdpa-tiles\" or \"dense\")",
            q.device(),
            q.kind(),
            q.size()[3]
        ),
    }
}

/// Dense-mask reference: SDPA with the full boolean mask of the layout.
pub fn dense_attention(q: &Tensor, k: &Tensor, v: &Tensor, layout: &BlockLayout) -> Result<Tensor> {
    let head_dim = q.size()[3];
    let scale = 1.0 / (head_dim as f64).sqrt();
    let mask = layout.needs_mask().then(|| layout.dense_mask(q.device()));
    Ok(Tensor::f_scaled_dot_product_attention(q, k, v, mask.as_ref(), 0.0, false, scale, false)?)
}

fn check_shapes(q: &Tensor, k: &Tensor, v: &Tensor, layout: &BlockLayout) -> Result<()> {
    let (qs, ks, vs) = (q.size(), k.size(), v.size());
    if qs.len() != 4 || ks.len() != 4 || vs.len() != 4 {
        bail!("attention expects [batch, heads, len, head_dim] tensors, got q {qs:?}, k {ks:?}, v {vs:?}");
    }
    ensure!(
        qs[2] as usize == layout.query_len()
            && ks[2] as usize == layout.key_len()
            && ks == vs
            && (qs[0], qs[1], qs[3]) == (ks[0], ks[1], ks[3]),
        "attention shapes q {qs:?}, k {ks:?}, v {vs:?} do not match layout {layout:?}"
    );
    ensure!(
        q.device() == k.device() && k.device() == v.device() && q.kind() == k.kind() && k.kind() == v.kind(),
        "q, k and v must share device and dtype (q {:?} {:?}, k {:?} {:?}, v {:?} {:?})",
        q.device(),
        q.kind(),
        k.device(),
        k.kind(),
        v.device(),
        v.kind()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/algorithm.md §2.2 written out element by element, independently of the tensor construction above.
    fn reference_allowed(n: usize, b: usize, q: usize, k: usize) -> bool {
        let half = |i: usize| usize::from(i >= n);
        let blk = |i: usize| (i - n * half(i)) / b;
        let m_bd = blk(q) == blk(k) && half(q) == half(k);
        let m_obc = half(q) == 0 && half(k) == 1 && blk(k) < blk(q);
        let m_bc = half(q) == 1 && half(k) == 1 && blk(k) <= blk(q);
        m_bd || m_obc || m_bc
    }

    fn mask_to_vec(mask: &Tensor) -> Vec<Vec<bool>> {
        let rows = mask.size()[0];
        (0..rows).map(|r| Vec::<bool>::try_from(mask.get(r)).unwrap()).collect()
    }

    #[test]
    fn two_stream_mask_matches_the_formula() {
        for n in [8usize, 16] {
            for b in [1usize, 2, 4, n] {
                let layout = BlockLayout::two_stream(n, b).unwrap();
                let mask = mask_to_vec(&layout.dense_mask(Device::Cpu));
                assert_eq!(mask.len(), 2 * n);
                for (q, row) in mask.iter().enumerate() {
                    assert_eq!(row.len(), 2 * n);
                    for (k, &allowed) in row.iter().enumerate() {
                        assert_eq!(allowed, reference_allowed(n, b, q, k), "L={n} L'={b} q={q} k={k}");
                        if q >= n && k < n {
                            assert!(!allowed, "clean query {q} sees noisy key {k}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn special_cases_of_the_two_stream_mask() {
        // L' = L: the noisy half sees exactly the noisy half (MDLM).
        let n = 8;
        let mask = mask_to_vec(&BlockLayout::two_stream(n, n).unwrap().dense_mask(Device::Cpu));
        for (q, row) in mask.iter().enumerate().take(n) {
            for (k, &allowed) in row.iter().enumerate() {
                assert_eq!(allowed, k < n, "q={q} k={k}");
            }
        }
        // L' = 1: noisy i sees itself and clean tokens < i (AR with a [MASK] query).
        let mask = mask_to_vec(&BlockLayout::two_stream(n, 1).unwrap().dense_mask(Device::Cpu));
        for (q, row) in mask.iter().enumerate().take(n) {
            for (k, &allowed) in row.iter().enumerate() {
                assert_eq!(allowed, k == q || (k >= n && k - n < q), "q={q} k={k}");
            }
        }
    }

    #[test]
    fn block_causal_is_the_clean_quadrant() {
        for (n, b) in [(8, 2), (16, 4), (8, 8), (8, 1)] {
            let two = BlockLayout::two_stream(n, b).unwrap().dense_mask(Device::Cpu);
            let clean = two.narrow(0, n as i64, n as i64).narrow(1, n as i64, n as i64);
            let one = BlockLayout::block_causal(n, b).unwrap().dense_mask(Device::Cpu);
            assert!(clean.equal(&one), "L={n} L'={b}");
        }
        let causal = BlockLayout::Causal { seq_len: 8 }.dense_mask(Device::Cpu);
        assert!(causal.equal(&BlockLayout::block_causal(8, 1).unwrap().dense_mask(Device::Cpu)));
    }

    #[test]
    fn bad_block_sizes_are_rejected() {
        assert!(BlockLayout::two_stream(16, 3).is_err());
        assert!(BlockLayout::two_stream(16, 0).is_err());
        assert!(BlockLayout::block_causal(0, 1).is_err());
    }

    #[test]
    fn dense_attention_equals_explicit_softmax() {
        tch::manual_seed(0);
        let layout = BlockLayout::two_stream(8, 2).unwrap();
        let (b, h, s, d) = (2, 3, 16, 4);
        let q = Tensor::randn([b, h, s, d], (Kind::Double, Device::Cpu));
        let k = Tensor::randn([b, h, s, d], (Kind::Double, Device::Cpu));
        let v = Tensor::randn([b, h, s, d], (Kind::Double, Device::Cpu));
        let out = block_diffusion_attention(&q, &k, &v, &layout).unwrap();
        let scores = q.matmul(&k.transpose(-2, -1)) / (d as f64).sqrt();
        let mask = layout.dense_mask(Device::Cpu);
        let scores = scores.masked_fill(&mask.logical_not(), f64::NEG_INFINITY);
        let expected = scores.softmax(-1, Kind::Double).matmul(&v);
        // fp64 sums of at most 16 terms in other orders: within 2·16·u ≈ 3.6e-15 of each other
        // (relative to values of order 1), far inside 1e-10.
        assert!(out.allclose(&expected, 1e-10, 1e-10, false));
        assert!(block_diffusion_attention(&q, &k, &v, &BlockLayout::two_stream(4, 2).unwrap()).is_err());
    }
}
