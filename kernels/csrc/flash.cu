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

constexpr int ROWS = 32;
constexpr int LANES = 4;
constexpr int THREADS = ROWS * LANES;
constexpr int COLS = 32;

__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Sum over the LANES threads of one row (adjacent lanes of a warp; every lane must call it).
__device__ __forceinline__ float row_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    x += __shfl_xor_sync(0xffffffffu, x, 2);
    return x;
}

// Rows [r0, r0 + COLS) of a [len, D] matrix into shared fp32; rows past `len` are zeros.
template <typename T, int D>
__device__ void load_tile(float (*dst)[D], const T* src, int r0, int len) {
    for (int i = threadIdx.x; i < COLS * D; i += THREADS) {
        const int r = i / D, c = i % D;
        dst[r][c] = (r0 + r < len) ? to_f(src[(size_t)(r0 + r) * D + c]) : 0.f;
    }
}

// This thread's share (elements lane, lane + LANES, …) of row `r` of a [len, D] matrix.
template <typename T, int D>
__device__ void load_share(float (&dst)[D / LANES], const T* src, int r, int len, int lane) {
#pragma unroll
    for (int i = 0; i < D / LANES; ++i) dst[i] = (r < len) ? to_f(src[(size_t)r * D + lane + LANES * i]) : 0.f;
}

template <typename T, int D>
__device__ void store_share(T* dst, const float (&src)[D / LANES], float factor, int r, int lane) {
#pragma unroll
    for (int i = 0; i < D / LANES; ++i) dst[(size_t)r * D + lane + LANES * i] = from_f<T>(src[i] * factor);
}

// Full dot product of a row whose share this thread holds with a shared-memory row.
template <int D>
__device__ __forceinline__ float dot(const float (&share)[D / LANES], const float* row, int lane) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < D / LANES; ++i) s += share[i] * row[lane + LANES * i];
    return row_sum(s);
}

// acc += w · row (this thread's share).
template <int D>
__device__ __forceinline__ void axpy(float (&acc)[D / LANES], float w, const float* row, int lane) {
#pragma unroll
    for (int i = 0; i < D / LANES; ++i) acc[i] += w * row[lane + LANES * i];
}

// Whether query q sees key kk inside a non-empty tile of kind `kind`.
__device__ __forceinline__ bool seen(const Bd3Layout& l, int kind, int q, int kk) {
    return q < l.sq && kk < l.sk && (kind == BD3_TILE_FULL || bd3_visible(l, q, kk));
}

template <typename T, int D>
__global__ void __launch_bounds__(THREADS)
    forward_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
                   float* __restrict__ lse, Bd3Layout l, float scale) {
    __shared__ float ks[COLS][D];
    __shared__ float vs[COLS][D];
    const size_t bh = blockIdx.y;
    q += bh * l.sq * D;
    out += bh * l.sq * D;
    k += bh * l.sk * D;
    v += bh * l.sk * D;
    lse += bh * l.sq;
    const int q0 = blockIdx.x * ROWS, q1 = min(q0 + ROWS, l.sq);
    const int row = q0 + threadIdx.x / LANES, lane = threadIdx.x % LANES;

    float qr[D / LANES], acc[D / LANES];
    load_share<T, D>(qr, q, row, l.sq, lane);
#pragma unroll
    for (int i = 0; i < D / LANES; ++i) acc[i] = 0.f;
    float m = -INFINITY, sum = 0.f;

    for (int k0 = 0; k0 < l.sk; k0 += COLS) {
        const int kind = bd3_classify(l, q0, q1, k0, min(k0 + COLS, l.sk));
        if (kind == BD3_TILE_EMPTY) continue;  // the same for the whole block
        __syncthreads();                       // everyone is done with the previous tile
        load_tile<T, D>(ks, k, k0, l.sk);
        load_tile<T, D>(vs, v, k0, l.sk);
        __syncthreads();

        float s[COLS];
        float tile_max = -INFINITY;
#pragma unroll
        for (int j = 0; j < COLS; ++j) {
            const float d = dot<D>(qr, ks[j], lane);
            s[j] = seen(l, kind, row, k0 + j) ? d * scale : -INFINITY;
            tile_max = fmaxf(tile_max, s[j]);
        }
        const float m_new = fmaxf(m, tile_max);
        if (m_new != -INFINITY) {  // otherwise this row has seen nothing yet
            const float correction = __expf(m - m_new);  // 0 while m = -inf
            sum *= correction;
#pragma unroll
            for (int i = 0; i < D / LANES; ++i) acc[i] *= correction;
#pragma unroll
            for (int j = 0; j < COLS; ++j) {
                const float p = __expf(s[j] - m_new);  // 0 for hidden keys
                sum += p;
                axpy<D>(acc, p, vs[j], lane);
            }
            m = m_new;
        }
    }
    if (row < l.sq) {
        store_share<T, D>(out, acc, sum > 0.f ? 1.f / sum : 0.f, row, lane);
        // +inf for a row that saw nothing makes every backward probability exp(s - lse) zero.
        if (lane == 0) lse[row] = sum > 0.f ? m + logf(sum) : INFINITY;
    }
}

// Everything the backward kernels read and write, moved to one (batch, head) by `at_head`.
template <typename T>
struct Backward {
    const T *q, *k, *v, *dout;
    const float *lse, *delta;
    T *dq, *dk, *dv;

    __device__ void at_head(size_t bh, const Bd3Layout& l, int d) {
        const size_t queries = bh * l.sq * d, keys = bh * l.sk * d;
        q += queries;
        dout += queries;
        dq += queries;
        k += keys;
        v += keys;
        dk += keys;
        dv += keys;
        lse += bh * l.sq;
        delta += bh * l.sq;
    }
};

// dQ_i = scale · Σ_j P_ij (dP_ij − delta_i) K_j with P recomputed from the log-sum-exp.
template <typename T, int D>
__global__ void __launch_bounds__(THREADS) grad_q_kernel(Backward<T> a, Bd3Layout l, float scale) {
    __shared__ float ks[COLS][D];
    __shared__ float vs[COLS][D];
    a.at_head(blockIdx.y, l, D);
    const T *q = a.q, *k = a.k, *v = a.v, *dout = a.dout;
    const float *lse = a.lse, *delta = a.delta;
    T* dq = a.dq;
    const int q0 = blockIdx.x * ROWS, q1 = min(q0 + ROWS, l.sq);
    const int row = q0 + threadIdx.x / LANES, lane = threadIdx.x % LANES;

    float qr[D / LANES], dor[D / LANES], acc[D / LANES];
    load_share<T, D>(qr, q, row, l.sq, lane);
    load_share<T, D>(dor, dout, row, l.sq, lane);
#pragma unroll
    for (int i = 0; i < D / LANES; ++i) acc[i] = 0.f;
    const float row_lse = row < l.sq ? lse[row] : INFINITY;
    const float row_delta = row < l.sq ? delta[row] : 0.f;

    for (int k0 = 0; k0 < l.sk; k0 += COLS) {
        const int kind = bd3_classify(l, q0, q1, k0, min(k0 + COLS, l.sk));
        if (kind == BD3_TILE_EMPTY) continue;
        __syncthreads();
        load_tile<T, D>(ks, k, k0, l.sk);
        load_tile<T, D>(vs, v, k0, l.sk);
        __syncthreads();
#pragma unroll 4
        for (int j = 0; j < COLS; ++j) {
            const float s = dot<D>(qr, ks[j], lane);
            const float dp = dot<D>(dor, vs[j], lane);
            const float p = seen(l, kind, row, k0 + j) ? __expf(s * scale - row_lse) : 0.f;
            axpy<D>(acc, p * (dp - row_delta), ks[j], lane);
        }
    }
    if (row < l.sq) store_share<T, D>(dq, acc, scale, row, lane);
}

// dV_j = Σ_i P_ij dO_i and dK_j = scale · Σ_i P_ij (dP_ij − delta_i) Q_i, one block per key tile.
template <typename T, int D>
__global__ void __launch_bounds__(THREADS) grad_kv_kernel(Backward<T> a, Bd3Layout l, float scale) {
    __shared__ float qs[COLS][D];
    __shared__ float dos[COLS][D];
    __shared__ float lses[COLS];
    __shared__ float deltas[COLS];
    a.at_head(blockIdx.y, l, D);
    const T *q = a.q, *k = a.k, *v = a.v, *dout = a.dout;
    const float *lse = a.lse, *delta = a.delta;
    T *dk = a.dk, *dv = a.dv;
    const int k0 = blockIdx.x * ROWS, k1 = min(k0 + ROWS, l.sk);
    const int key = k0 + threadIdx.x / LANES, lane = threadIdx.x % LANES;

    float kr[D / LANES], vr[D / LANES], dk_acc[D / LANES], dv_acc[D / LANES];
    load_share<T, D>(kr, k, key, l.sk, lane);
    load_share<T, D>(vr, v, key, l.sk, lane);
#pragma unroll
    for (int i = 0; i < D / LANES; ++i) dk_acc[i] = dv_acc[i] = 0.f;

    for (int q0 = 0; q0 < l.sq; q0 += COLS) {
        const int kind = bd3_classify(l, q0, min(q0 + COLS, l.sq), k0, k1);
        if (kind == BD3_TILE_EMPTY) continue;
        __syncthreads();
        load_tile<T, D>(qs, q, q0, l.sq);
        load_tile<T, D>(dos, dout, q0, l.sq);
        if (threadIdx.x < COLS) {
            const int r = q0 + threadIdx.x;
            lses[threadIdx.x] = r < l.sq ? lse[r] : INFINITY;
            deltas[threadIdx.x] = r < l.sq ? delta[r] : 0.f;
        }
        __syncthreads();
#pragma unroll 4
        for (int i = 0; i < COLS; ++i) {
            const float s = dot<D>(kr, qs[i], lane);
            const float dp = dot<D>(vr, dos[i], lane);
            const float p = seen(l, kind, q0 + i, key) ? __expf(s * scale - lses[i]) : 0.f;
            axpy<D>(dv_acc, p, dos[i], lane);
            axpy<D>(dk_acc, p * (dp - deltas[i]), qs[i], lane);
        }
    }
    if (key < l.sk) {
        store_share<T, D>(dk, dk_acc, scale, key, lane);
        store_share<T, D>(dv, dv_acc, 1.f, key, lane);
    }
}

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
