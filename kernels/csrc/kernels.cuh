// The fused attention kernels, written once for two compilers: flash.cu compiles them with nvcc
// for fp16/bf16, and emulate.cpp compiles them with the host C++ compiler for fp32, running each
// thread block on CPU threads, so that a test checks their arithmetic without a GPU.
//
// Include inside a namespace, after layout.cuh and after defining `float to_f(T)` and
// `template <typename T> T from_f(float)` for the element types (and, on the host, the CUDA
// intrinsics this file uses).
#pragma once

constexpr int ROWS = 32;
constexpr int LANES = 4;
constexpr int THREADS = ROWS * LANES;
constexpr int COLS = 32;

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
