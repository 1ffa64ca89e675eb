//! The tensor-core kernels (`csrc/kernels.cuh`), run by the CPU emulation (`kernels::emulation`:
//! fibers for threads, `mma.sync`/`ldmatrix`/`cp.async` emulated lane by lane with the PTX
//! fragment layouts), against the dense reference: output, log-sum-exp, dQ, dK and dV, for
//! L ∈ {16, 48, 128, 200, 1024}, every valid L′ ∈ {1, 4, 16, 64, L}, every layout (two-stream,
//! block-causal, causal, decode), odd batch and head counts, head dims 64 and 128.
//!
//! Tolerances:
//! - fp32 (the arithmetic itself, no rounding): |ours − ref| ≤ 1e-5 · (1 + max |ref|).
//! - bf16 / fp16 with fp32 accumulation: the reference is exact (f64) on the same rounded inputs,
//!   so the error comes from the roundings the kernels make, each at most u·|x| with the unit
//!   roundoff u = 2⁻⁸ (bf16) or 2⁻¹¹ (fp16): P (forward, dV) and dS (dQ, dK) rounded before their
//!   second product, the rounded O inside delta = rowsum(dO ∘ O), and the outputs. Element-wise:
//!   out ≤ 2u · (P|V|), dV ≤ 2u · (Pᵀ|dO|), dQ ≤ 3u · scale · (|dS| + P·a) |K|,
//!   dK ≤ 3u · scale · (|dS| + P·a)ᵀ |Q|, with a_i = Σ_d |dO_id| (P|V|)_id bounding delta's error, plus 1e-5 · (1 + max |ref|) for the
//!   fp32 accumulation; lse (fp32 from the rounded inputs) ≤ 1e-5 · (1 + |ref|).

use kernels::emulation::{self, KernelLayout, Variant};
use kernels::BlockLayout;
use tch::{Device, Kind, Tensor};

mod common;

/// The exact results on the rounded inputs, and the element-wise sums of magnitudes that bound
/// the rounding errors (see the module comment).
struct Reference {
    out: Tensor,
    lse: Tensor,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
    mag_out: Tensor,
    mag_dq: Tensor,
    mag_dk: Tensor,
    mag_dv: Tensor,
}

fn reference(q: &Tensor, k: &Tensor, v: &Tensor, g: &Tensor, layout: &BlockLayout) -> Reference {
    let [q, k, v, g] = [q, k, v, g].map(|t| t.to_kind(Kind::Double));
    let scale = 1.0 / (q.size()[3] as f64).sqrt();
    let hidden = layout.dense_mask(Device::Cpu).logical_not();
    let s = (q.matmul(&k.transpose(-2, -1)) * scale).masked_fill(&hidden, f64::NEG_INFINITY);
    let lse = s.logsumexp([-1], true);
    let p = (&s - &lse).exp();
    let out = p.matmul(&v);
    let dp = g.matmul(&v.transpose(-2, -1));
    let delta = (&g * &out).sum_dim_intlist(-1, true, Kind::Double);
    let ds = &p * (dp - delta);
    let mag_out = p.matmul(&v.abs());
    let a = (g.abs() * &mag_out).sum_dim_intlist(-1, true, Kind::Double);
    let mag_ds = ds.abs() + &p * a;
    Reference {
        dq: ds.matmul(&k) * scale,
        dk: ds.transpose(-2, -1).matmul(&q) * scale,
        dv: p.transpose(-2, -1).matmul(&g),
        mag_dq: mag_ds.matmul(&k.abs()) * scale,
        mag_dk: mag_ds.transpose(-2, -1).matmul(&q.abs()) * scale,
        mag_dv: p.transpose(-2, -1).matmul(&g.abs()),
        out,
        lse: lse.squeeze_dim(-1),
        mag_out,
    }
}

fn unit_roundoff(kind: Kind) -> f64 {
    match kind {
        Kind::BFloat16 => 2f64.powi(-8),
        Kind::Half => 2f64.powi(-11),
        _ => 0.0,
    }
}

/// Runs the emulated kernels on one case; `Err` names the first quantity outside its tolerance.
fn check(layout: &BlockLayout, batch: i64, heads: i64, dim: i64, kind: Kind, variant: Variant) -> Result<(), String> {
    let shape = |len: usize| [batch, heads, len as i64, dim];
    // Inputs rounded to `kind` first, so that the reference sees exactly what the kernels see.
    let make = |len: usize| Tensor::randn(shape(len), (Kind::Float, Device::Cpu)).to_kind(kind);
    let (q, k, v, g) =
        (make(layout.query_len()), make(layout.key_len()), make(layout.key_len()), make(layout.query_len()));
    let (out, lse) = emulation::forward(&q, &k, &v, layout, kind, variant).map_err(|e| e.to_string())?;
    let (dq, dk, dv) =
        emulation::backward(&q, &k, &v, &out, &lse, &g, layout, kind, variant).map_err(|e| e.to_string())?;
    let r = reference(&q, &k, &v, &g, layout);
    let u = unit_roundoff(kind);
    let lse_excess = ((lse.to_kind(Kind::Double) - &r.lse).abs() - (r.lse.abs() + 1.0) * 1e-5).max();
    let lse_excess = lse_excess.double_value(&[]);
    if lse_excess.is_nan() || lse_excess > 0.0 {
        return Err(format!(
            "{layout:?} B={batch} H={heads} D={dim} {kind:?}: lse off by {lse_excess:e} beyond its bound"
        ));
    }
    for (what, ours, exact, magnitude, factor) in [
        ("out", &out, &r.out, &r.mag_out, 2.0),
        ("dq", &dq, &r.dq, &r.mag_dq, 3.0),
        ("dk", &dk, &r.dk, &r.mag_dk, 3.0),
        ("dv", &dv, &r.dv, &r.mag_dv, 2.0),
    ] {
        let slack = 1e-5 * (1.0 + exact.abs().max().double_value(&[]));
        let bound = magnitude * (factor * u) + slack;
        let err = (ours.to_kind(Kind::Double) - exact).abs();
        let excess = (&err - &bound).max().double_value(&[]);
        if excess.is_nan() || excess > 0.0 {
            let worst = err.max().double_value(&[]);
            return Err(format!(
                "{layout:?} B={batch} H={heads} D={dim} {kind:?}: {what} max error {worst:e} exceeds its bound by {excess:e}"
            ));
        }
    }
    Ok(())
}

/// Two-stream and block-causal layouts for every valid L′ ∈ {1, 4, 16, 64, L}, and causal.
fn layouts_of(n: usize) -> Vec<BlockLayout> {
    let mut blocks: Vec<usize> = [1, 4, 16, 64, n].into_iter().filter(|b| *b <= n && n % b == 0).collect();
    blocks.dedup();
    common::small_layouts(&[(n, &blocks)]).into_iter().filter(|l| !matches!(l, BlockLayout::Decode { .. })).collect()
}

fn decode_layouts() -> Vec<BlockLayout> {
    vec![
        BlockLayout::Decode { prefix_len: 0, block_len: 4, position: 0 },
        BlockLayout::Decode { prefix_len: 37, block_len: 5, position: 50 },
        BlockLayout::Decode { prefix_len: 1008, block_len: 16, position: 1008 },
    ]
}

/// Odd batch and head counts, fewer rows where the sequences are long (the emulation is slow).
fn batch_heads(layout: &BlockLayout) -> (i64, i64) {
    match layout.query_len().max(layout.key_len()) {
        n if n <= 100 => (3, 5),
        n if n <= 400 => (1, 3),
        _ => (1, 1),
    }
}

fn check_all(layouts: &[BlockLayout], dims: &[i64], kind: Kind) {
    tch::manual_seed(7);
    let mut failures = Vec::new();
    for layout in layouts {
        for &dim in dims {
            let (b, h) = batch_heads(layout);
            if let Err(e) = check(layout, b, h, dim, kind, Variant::Exact) {
                failures.push(e);
            }
        }
    }
    assert!(failures.is_empty(), "{} case(s) failed:\n{}", failures.len(), failures.join("\n"));
}

fn short_layouts() -> Vec<BlockLayout> {
    let mut all: Vec<BlockLayout> = [16, 48, 128, 200].into_iter().flat_map(layouts_of).collect();
    all.extend(decode_layouts());
    all
}

#[test]
fn fp32_kernels_equal_the_reference_for_short_sequences() {
    check_all(&short_layouts(), &[64, 128], Kind::Float);
}

#[test]
fn fp32_kernels_equal_the_reference_at_length_1024() {
    check_all(&layouts_of(1024), &[64, 128], Kind::Float);
}

#[test]
fn bf16_kernels_stay_within_the_rounding_bound_for_short_sequences() {
    check_all(&short_layouts(), &[64, 128], Kind::BFloat16);
}

#[test]
fn bf16_kernels_stay_within_the_rounding_bound_at_length_1024() {
    check_all(&layouts_of(1024), &[64, 128], Kind::BFloat16);
}

#[test]
fn fp16_kernels_stay_within_the_rounding_bound() {
    let mut layouts = layouts_of(48);
    layouts.extend(layouts_of(200));
    layouts.extend(decode_layouts());
    check_all(&layouts, &[64, 128], Kind::Half);
}

/// The test-only build with a wrong accumulator fragment mapping must fail the same checks, on
/// layouts with partial tiles and on the all-visible decode layout alike.
#[test]
fn a_wrong_fragment_mapping_is_caught() {
    tch::manual_seed(3);
    let cases = [
        BlockLayout::two_stream(48, 4).unwrap(),
        BlockLayout::Causal { seq_len: 40 },
        BlockLayout::Decode { prefix_len: 37, block_len: 5, position: 50 },
    ];
    for layout in cases {
        for kind in [Kind::Float, Kind::BFloat16] {
            check(&layout, 1, 3, 64, kind, Variant::Exact).unwrap();
            let caught = check(&layout, 1, 3, 64, kind, Variant::WrongFragment);
            assert!(caught.is_err(), "{layout:?} {kind:?}: the wrong fragment mapping passed");
        }
    }
}

#[test]
fn unsupported_head_dims_dtypes_and_shapes_are_errors() {
    let layout = BlockLayout::two_stream(8, 2).unwrap();
    let t = Tensor::zeros([1, 1, 16, 32], (Kind::Float, Device::Cpu));
    let err = emulation::forward(&t, &t, &t, &layout, Kind::Float, Variant::Exact).unwrap_err();
    assert!(err.to_string().contains("head dims 64 and 128"), "{err}");
    let t = Tensor::zeros([1, 1, 16, 64], (Kind::Float, Device::Cpu));
    let err = emulation::forward(&t, &t, &t, &layout, Kind::Double, Variant::Exact).unwrap_err();
    assert!(err.to_string().contains("fp32, bf16 and fp16"), "{err}");
    // Shapes the kernels would index out of bounds are refused before the C++ side runs.
    let short = Tensor::zeros([1, 1, 8, 64], (Kind::Float, Device::Cpu));
    let err = emulation::forward(&t, &t, &short, &layout, Kind::Float, Variant::Exact).unwrap_err();
    assert!(err.to_string().contains("do not match layout"), "{err}");
    let (out, lse) = emulation::forward(&t, &t, &t, &layout, Kind::Float, Variant::Exact).unwrap();
    let err = emulation::backward(&t, &t, &t, &out, &lse, &short, &layout, Kind::Float, Variant::Exact).unwrap_err();
    assert!(err.to_string().contains("must match q"), "{err}");
}

#[test]
fn kernel_layout_agrees_with_tiles_rs() {
    for layout in common::small_layouts(&[(8, &[1, 2, 4, 8]), (12, &[1, 3, 12]), (48, &[1, 4, 16, 48])]) {
        let twin = KernelLayout::new(&layout).unwrap();
        let (nq, nk) = (layout.query_len(), layout.key_len());
        for q in 0..nq {
            for k in 0..nk {
                assert_eq!(twin.visible(q, k), layout.visible(q, k), "{layout:?} q={q} k={k}");
            }
        }
        // Every tile of every size the kernels could use, at every offset of a small grid.
        for tile in [1usize, 2, 3, 5, 8, 32, 64] {
            for q0 in (0..nq).step_by(tile.min(3)) {
                for k0 in (0..nk).step_by(tile.min(3)) {
                    let (q1, k1) = ((q0 + tile).min(nq), (k0 + tile).min(nk));
                    assert_eq!(
                        twin.classify(q0..q1, k0..k1),
                        layout.classify(q0..q1, k0..k1),
                        "{layout:?} q {q0}..{q1} k {k0}..{k1}"
                    );
                }
            }
        }
    }
}
