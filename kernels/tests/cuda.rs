//! The parts of the CUDA path that run without a GPU (feature `cuda`): the tile classification
//! compiled into the kernels agrees with `tiles.rs`, and errors from the C++ autograd Function come
//! back as `Err` instead of crossing the FFI boundary. On a GPU machine the same tests also run
//! the fused kernels against the dense reference (the bf16/fp16 parity lives in the
//! `cuda_check` example that `kernels/gpu-check.sh` runs).
#![cfg(feature = "cuda")]

use kernels::cuda::{flash_attention, supports, KernelLayout};
use kernels::BlockLayout;
use tch::{Device, Kind, Tensor};

mod common;

fn layouts() -> Vec<BlockLayout> {
    common::small_layouts(&[(8, &[1, 2, 4, 8]), (12, &[1, 3, 12]), (48, &[1, 4, 16, 48])])
}

#[test]
fn kernel_layout_agrees_with_tiles_rs() {
    for layout in layouts() {
        let twin = KernelLayout::new(&layout).unwrap();
        let (nq, nk) = (layout.query_len(), layout.key_len());
        for q in 0..nq {
            for k in 0..nk {
                assert_eq!(twin.visible(q, k), layout.visible(q, k), "{layout:?} q={q} k={k}");
            }
        }
        // Every tile of every size the kernels could use, at every offset of a small grid.
        for tile in [1usize, 2, 3, 5, 8, 32] {
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

#[test]
fn unsupported_inputs_are_errors_not_crashes() {
    let layout = BlockLayout::two_stream(8, 2).unwrap();
    let cpu = Tensor::zeros([1, 2, 16, 64], (Kind::BFloat16, Device::Cpu));
    assert!(!supports(&cpu, &cpu, &cpu));
    let err = flash_attention(&cpu, &cpu, &cpu, &layout).unwrap_err().to_string();
    assert!(err.contains("CUDA tensors"), "{err}");
}

/// The kernels' own code (run on CPU threads, fp32) against the dense reference: output, row
/// log-sum-exp, and dq/dk/dv, on layouts with empty, full and partial tiles (of 32), lengths that
/// are not tile multiples, and both head dims.
#[test]
fn kernel_code_matches_the_reference_on_cpu_threads() {
    use kernels::cuda::emulation;
    tch::manual_seed(11);
    // Small on purpose: every emulated warp shuffle is a barrier of 32 OS threads.
    let cases = [
        (BlockLayout::two_stream(24, 8).unwrap(), 64),
        (BlockLayout::two_stream(20, 1).unwrap(), 64),
        (BlockLayout::Causal { seq_len: 40 }, 128),
        (BlockLayout::Decode { prefix_len: 37, block_len: 5, position: 40 }, 64),
    ];
    for (layout, d) in cases {
        let shape = |len: usize| [1i64, 1, len as i64, d];
        let opts = (Kind::Float, Device::Cpu);
        let (q, k, v) = (
            Tensor::randn(shape(layout.query_len()), opts),
            Tensor::randn(shape(layout.key_len()), opts),
            Tensor::randn(shape(layout.key_len()), opts),
        );
        let g = Tensor::randn(shape(layout.query_len()), opts);

        let (out, lse) = emulation::forward(&q, &k, &v, &layout).unwrap();
        let (dq, dk, dv) = emulation::backward(&q, &k, &v, &out, &lse, &g, &layout).unwrap();

        let [rq, rk, rv] = [&q, &k, &v].map(|t| t.copy().set_requires_grad(true));
        let reference = kernels::dense_attention(&rq, &rk, &rv, &layout).unwrap();
        (&reference * &g).sum(Kind::Float).backward();
        let scores = rq.matmul(&rk.transpose(-2, -1)) / (d as f64).sqrt();
        let hidden = layout.dense_mask(Device::Cpu).logical_not();
        let ref_lse = scores.masked_fill(&hidden, f64::NEG_INFINITY).logsumexp([-1], false);

        for (what, a, b) in [
            ("out", &out, &reference.detach()),
            ("lse", &lse, &ref_lse.detach()),
            ("dq", &dq, &rq.grad()),
            ("dk", &dk, &rk.grad()),
            ("dv", &dv, &rv.grad()),
        ] {
            let diff = (a - b).abs().max().double_value(&[]);
            let tol = 1e-4 * (1.0 + b.abs().max().double_value(&[]));
            assert!(diff <= tol, "{layout:?} D={d}: {what} differs by {diff} (tol {tol})");
        }
    }
}

/// Runs only where libtorch sees a GPU: output and gradients against the dense reference.
#[test]
fn fused_kernels_match_the_reference_on_a_gpu() {
    if !tch::Cuda::is_available() {
        eprintln!("no CUDA device: skipped");
        return;
    }
    let device = Device::Cuda(0);
    for layout in
        [BlockLayout::two_stream(128, 16).unwrap(), BlockLayout::Decode { prefix_len: 64, block_len: 16, position: 64 }]
    {
        let shape = |len: usize| [3i64, 5, len as i64, 64];
        let make = |len| Tensor::randn(shape(len), (Kind::BFloat16, device)).set_requires_grad(true);
        let (q, k, v) = (make(layout.query_len()), make(layout.key_len()), make(layout.key_len()));
        let out = flash_attention(&q, &k, &v, &layout).unwrap();
        let reference = kernels::dense_attention(&q, &k, &v, &layout).unwrap();
        let diff = (out.to_kind(Kind::Float) - reference.to_kind(Kind::Float)).abs().max().double_value(&[]);
        assert!(diff < 2e-2, "{layout:?}: output differs by {diff}");
    }
}
