//! The parts of the CUDA path that run without a GPU (feature `cuda`): errors from the C++ autograd
//! Function come back as `Err` instead of crossing the FFI boundary. On a GPU machine the same
//! tests also run the fused kernels against the dense reference (the bf16/fp16 parity of every
//! backend lives in the `cuda_check` example that `kernels/gpu-check.sh` runs). The kernels'
//! arithmetic is tested without a GPU, in every build, by `tensor_cores.rs`.
#![cfg(feature = "cuda")]

use kernels::cuda::{flash_attention, supports};
use kernels::BlockLayout;
use tch::{Device, Kind, Tensor};

#[test]
fn unsupported_inputs_are_errors_not_crashes() {
    let layout = BlockLayout::two_stream(8, 2).unwrap();
    let cpu = Tensor::zeros([1, 2, 16, 64], (Kind::BFloat16, Device::Cpu));
    assert!(!supports(&cpu, &cpu, &cpu));
    let err = flash_attention(&cpu, &cpu, &cpu, &layout).unwrap_err().to_string();
    assert!(err.contains("CUDA tensors"), "{err}");
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
