// Fused block-diffusion attention on CUDA: a FlashAttention-2-style forward (tiled, online
// softmax, saves the row log-sum-exp) and the matching backward, for fp16/bf16 inputs with fp32
// accumulation and head dims 64 and 128. The mask is never materialized: each thread block asks
// layout.cuh whether a (query tile, key tile) pair is empty (skipped before any load), full (no
// mask) or partial (the element rule per score).
//
// Work split: a thread block owns ROWS rows (queries in the forward and dQ kernels, keys in the
// dK/dV kernel); LANES adjacent threads share a row, each holding every LANES-th element of the
// head dimension in registers, and reduce dot products with two warp shuffles. The other operand
// streams through shared memory COLS rows at a time, converted to fp32 once per tile. The backward
// is two kernels (dQ over query tiles, dK/dV over key tiles) that each recompute the scores from
// the saved log-sum-exp: no atomics, deterministic results.
//
// This is a first, straightforward version: scores and products use fp32 FMA (CUDA cores), not
// tensor cores. See kernels/README.md for what is verified and what is next.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>

#include "flash.h"

namespace {

__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

#include "kernels.cuh"

template <typename T, int D>
struct Config {
    using type = T;
    static constexpr int dim = D;
};

// Calls f(Config<T, D>{}) for a supported (dtype, head_dim), else reports invalid arguments.
template <typename F>
int dispatch(int dtype, int head_dim, int batch_heads, const Bd3Layout& l, F&& f) {
    // gridDim.y holds batch·heads; empty problems never reach the kernels.
    if (batch_heads <= 0 || batch_heads > 65535 || l.sq <= 0 || l.sk <= 0) return (int)cudaErrorInvalidValue;
    if (dtype == BD3_DTYPE_F16 && head_dim == 64) return f(Config<__half, 64>{});
    if (dtype == BD3_DTYPE_F16 && head_dim == 128) return f(Config<__half, 128>{});
    if (dtype == BD3_DTYPE_BF16 && head_dim == 64) return f(Config<__nv_bfloat16, 64>{});
    if (dtype == BD3_DTYPE_BF16 && head_dim == 128) return f(Config<__nv_bfloat16, 128>{});
    return (int)cudaErrorInvalidValue;
}

}  // namespace

extern "C" int bd3_flash_forward(int dtype, int head_dim, const void* q, const void* k, const void* v, void* out,
                                 float* lse, int batch_heads, Bd3Layout layout, float scale, void* stream) {
    return dispatch(dtype, head_dim, batch_heads, layout, [&](auto config) {
        using T = typename decltype(config)::type;
        constexpr int D = decltype(config)::dim;
        const dim3 grid((layout.sq + ROWS - 1) / ROWS, batch_heads);
        forward_kernel<T, D><<<grid, THREADS, 0, (cudaStream_t)stream>>>(
            (const T*)q, (const T*)k, (const T*)v, (T*)out, lse, layout, scale);
        return (int)cudaGetLastError();
    });
}

extern "C" int bd3_flash_backward(int dtype, int head_dim, const void* q, const void* k, const void* v,
                                  const void* grad_out, const float* lse, const float* delta, void* grad_q,
                                  void* grad_k, void* grad_v, int batch_heads, Bd3Layout layout, float scale,
                                  void* stream) {
    return dispatch(dtype, head_dim, batch_heads, layout, [&](auto config) {
        using T = typename decltype(config)::type;
        constexpr int D = decltype(config)::dim;
        const Backward<T> args{(const T*)q, (const T*)k,  (const T*)v,  (const T*)grad_out, lse, delta,
                               (T*)grad_q,  (T*)grad_k, (T*)grad_v};
        const dim3 q_grid((layout.sq + ROWS - 1) / ROWS, batch_heads);
        grad_q_kernel<T, D><<<q_grid, THREADS, 0, (cudaStream_t)stream>>>(args, layout, scale);
        const int err = (int)cudaGetLastError();
        if (err != 0) return err;
        const dim3 kv_grid((layout.sk + ROWS - 1) / ROWS, batch_heads);
        grad_kv_kernel<T, D><<<kv_grid, THREADS, 0, (cudaStream_t)stream>>>(args, layout, scale);
        return (int)cudaGetLastError();
    });
}

extern "C" int bd3_layout_classify(Bd3Layout layout, int q0, int q1, int k0, int k1) {
    return bd3_classify(layout, q0, q1, k0, k1);
}

extern "C" int bd3_layout_visible(Bd3Layout layout, int q, int k) { return bd3_visible(layout, q, k) ? 1 : 0; }
