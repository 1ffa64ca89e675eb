// Launchers of the fused block-diffusion attention kernels (flash.cu). Plain C types only, so the
// libtorch side (autograd.cpp, compiled by the host compiler) and the CUDA side (compiled by nvcc)
// share nothing but this header and layout.cuh.
//
// Tensors are contiguous [batch·heads, len, head_dim] of the input dtype; `lse` and `delta` are
// fp32 [batch·heads, sq]. `stream` is a cudaStream_t. Each launcher returns a cudaError_t value
// (0 = success).
#pragma once

#include "layout.cuh"

// fp32 exists only in the CPU emulation (emulate.cpp).
enum { BD3_DTYPE_F16 = 0, BD3_DTYPE_BF16 = 1, BD3_DTYPE_F32 = 2 };

#ifdef __cplusplus
extern "C" {
#endif

// O = softmax(scale · Q Kᵀ + mask) V, and the row log-sum-exp of the masked, scaled scores
// (+inf for a query that sees no key, so that its backward probabilities are 0).
int bd3_flash_forward(int dtype, int head_dim, const void* q, const void* k, const void* v, void* out, float* lse,
                      int batch_heads, Bd3Layout layout, float scale, void* stream);

// dQ, dK, dV from the saved inputs, lse and delta = rowsum(dO ∘ O).
int bd3_flash_backward(int dtype, int head_dim, const void* q, const void* k, const void* v, const void* grad_out,
                       const float* lse, const float* delta, void* grad_q, void* grad_k, void* grad_v,
                       int batch_heads, Bd3Layout layout, float scale, void* stream);

// Host-side views of layout.cuh for the Rust tests (emulate.cpp).
int bd3_layout_classify(Bd3Layout layout, int q0, int q1, int k0, int k1);
int bd3_layout_visible(Bd3Layout layout, int q, int k);

#ifdef __cplusplus
}
#endif
