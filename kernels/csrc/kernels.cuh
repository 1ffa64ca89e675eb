// The fused attention kernels on tensor cores, written once for two compilers: flash.cu compiles
// them with nvcc for fp16/bf16 (mma.sync, ldmatrix and cp.async from warp.cuh), and emulate.cpp
// compiles them with the host C++ compiler, where every thread of a block is a fiber and the
// warp-level primitives are emulated lane by lane with the PTX ISA's fragment layouts, so that a
// test checks the kernels' arithmetic and their fragment indexing without a GPU.
//
// Include inside a namespace (emulate.cpp includes it twice: once as compiled for the GPU, once
// with BD3_TEST_WRONG_FRAGMENT), after layout.cuh and after the platform has defined, for each
// element type T: `Reg<T>` (a 32-bit register holding two T, the lower-indexed element in the low
// half), `pack<T>(lo, hi)`, `to_f(T)`, `mma_16816`, `ldmatrix_x4`, `ldmatrix_x4_trans`,
// `cp_async_chunk`, `cp_async_commit`, `cp_async_wait_all`, `shared_memory<T>()`, and the CUDA
// built-ins used here (threadIdx, blockIdx, __syncthreads, __shfl_xor_sync, __expf).
//
// Work split (FlashAttention-2): a thread block of WARPS warps owns ROWS = 16·WARPS rows (queries
// in the forward and dQ kernels, keys in the dK/dV kernel); warp w owns rows 16w..16w+16, the M
// dimension of its m16n8k16 products. The other operand streams through shared memory C rows at a
// time, double-buffered with cp.async (the next non-empty tile loads while the current one is
// used), in a swizzled layout so that ldmatrix reads 8 rows without bank conflicts. Tiles the
// layout leaves empty are skipped before any load; the mask is evaluated only in partial tiles.
// The backward recomputes P from the saved log-sum-exp in two kernels (dQ over query tiles, dK/dV
// over key tiles): no atomics, deterministic.

constexpr int WARPS = 4;
constexpr int THREADS = 32 * WARPS;
constexpr int ROWS = 16 * WARPS;  // 64: rows owned by a thread block
constexpr int CHUNK = 8;          // elements per 16-byte cp.async / per ldmatrix row (fp16, bf16)

// The streamed tile's rows: 64, and 32 in the backward at head dim 128 (register pressure).
template <int D>
constexpr int FORWARD_COLS = 64;
template <int D>
constexpr int BACKWARD_COLS = D == 128 ? 32 : 64;

// --- Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type") ---
// A lane's groupID is lane / 4 and its threadID_in_group lane % 4.
// Accumulator C/D (16 × 8, fp32): element i ∈ 0..4 is at row groupID + 8·(i / 2), column
// 2·threadID_in_group + i % 2.
__device__ __forceinline__ int acc_row(int lane, int i) {
#ifdef BD3_TEST_WRONG_FRAGMENT
    return lane / 4 + 8 * (i % 2);  // deliberately wrong, for the test that must catch it
#else
    return lane / 4 + 8 * (i / 2);
#endif
}
__device__ __forceinline__ int acc_col(int lane, int i) { return 2 * (lane % 4) + i % 2; }

// Multiplicand A (16 × 16, row-major) register r ∈ 0..4 holds row groupID + 8·(r % 2), columns
// 2·threadID_in_group + 8·(r / 2) and the next. The accumulators of two adjacent n8 tiles
// therefore are, after rounding, exactly the A registers of one k16 step: this is how P and dS
// go from one product into the next without leaving registers.
template <typename T>
__device__ __forceinline__ void a_from_acc(Reg<T> (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
    a[0] = pack<T>(lo[0], lo[1]);
    a[1] = pack<T>(lo[2], lo[3]);
    a[2] = pack<T>(hi[0], hi[1]);
    a[3] = pack<T>(hi[2], hi[3]);
}

// Multiplicand B (16 × 8, column-major) register r ∈ 0..2 holds column groupID, rows
// 2·threadID_in_group + 8·r and the next. For B = Mᵀ with M row-major in shared memory (keys or
// queries × head dim) that is a row of M, read by ldmatrix without .trans; for B = M (k = the
// streamed rows) it is a column, read with .trans.

// --- Shared memory tiles ---
// Element (r, c) of a [rows][D] tile: the 16-byte chunks of row r are permuted by XOR with r % 8,
// so the 8 row addresses of an ldmatrix (one chunk each) fall in 8 different bank groups.
template <int D>
__device__ __forceinline__ int swz(int r, int c) {
    return r * D + (((c / CHUNK) ^ (r % 8)) * CHUNK) + c % CHUNK;
}

// Starts copying rows [r0, r0 + R) of a [len, D] matrix into a swizzled tile; rows past `len` are
// zero-filled. Completes at the next cp_async_wait_all.
template <typename T, int D, int R>
__device__ __forceinline__ void load_rows(T* dst, const T* src, int r0, int len) {
    constexpr int chunks = D / CHUNK;
    for (int i = threadIdx.x; i < R * chunks; i += THREADS) {
        const int r = i / chunks, c = (i % chunks) * CHUNK;
        const bool valid = r0 + r < len;
        cp_async_chunk<T>(dst + swz<D>(r, c), src + (size_t)(valid ? r0 + r : 0) * D + c, valid);
    }
}

// A fragments (16 rows × D) of rows r0..r0+16 of a swizzled [*][D] tile, one per k16 step.
template <typename T, int D>
__device__ __forceinline__ void load_a(Reg<T> (&a)[D / 16][4], const T* tile, int r0, int lane) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4<T>(a[kk], tile + swz<D>(r0 + lane % 16, kk * 16 + (lane / 16) * 8));
}

// acc[j] += A · Mᵀ for the 8-row groups j of a streamed [C][D] tile M (M rows are the N dimension).
template <typename T, int D, int C>
__device__ __forceinline__ void mma_abt(float (&acc)[C / 8][4], const Reg<T> (&a)[D / 16][4], const T* tile, int lane) {
#pragma unroll
    for (int j = 0; j < C / 8; j += 2) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            Reg<T> b[4];
            ldmatrix_x4<T>(b, tile + swz<D>(j * 8 + (lane / 16) * 8 + lane % 8, kk * 16 + ((lane / 8) % 2) * 8));
            mma_16816<T>(acc[j], a[kk], b[0], b[1]);
            mma_16816<T>(acc[j + 1], a[kk], b[2], b[3]);
        }
    }
}

// acc += P · M for P (16 × C, the accumulators of mma_abt) and a streamed [C][D] tile M.
template <typename T, int D, int C>
__device__ __forceinline__ void mma_ab(float (&acc)[D / 8][4], const float (&p)[C / 8][4], const T* tile, int lane) {
#pragma unroll
    for (int kk = 0; kk < C / 16; ++kk) {
        Reg<T> a[4];
        a_from_acc<T>(a, p[2 * kk], p[2 * kk + 1]);
#pragma unroll
        for (int n = 0; n < D / 8; n += 2) {
            Reg<T> b[4];
            ldmatrix_x4_trans<T>(b, tile + swz<D>(kk * 16 + ((lane / 8) % 2) * 8 + lane % 8, n * 8 + (lane / 16) * 8));
            mma_16816<T>(acc[n], a, b[0], b[1]);
            mma_16816<T>(acc[n + 1], a, b[2], b[3]);
        }
    }
}

template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4]) {
#pragma unroll
    for (int j = 0; j < N; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;
}

// Reductions over the 4 lanes of a group (the lanes that share an accumulator row).
__device__ __forceinline__ float group_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float group_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// The first tile of C streamed rows at or after `from` that the owned rows [r0, r1) see (or
// `end`). `keys_stream`: the streamed rows are keys (forward, dQ) or queries (dK/dV).
template <int C>
__device__ __forceinline__ int next_tile(const Bd3Layout& l, bool keys_stream, int r0, int r1, int from) {
    const int end = keys_stream ? l.sk : l.sq;
    for (int s = from; s < end; s += C) {
        const int e = min(s + C, end);
        const int kind = keys_stream ? bd3_classify(l, r0, r1, s, e) : bd3_classify(l, s, e, r0, r1);
        if (kind != BD3_TILE_EMPTY) return s;
    }
    return end;
}

// Whether query q sees key k in a tile of kind `kind` (positions past the ends see nothing).
__device__ __forceinline__ bool seen(const Bd3Layout& l, int kind, int q, int k) {
    return q < l.sq && k < l.sk && (kind == BD3_TILE_FULL || bd3_visible(l, q, k));
}

template <typename T>
__device__ __forceinline__ void store_pair(T* dst, float lo, float hi) {
    *reinterpret_cast<Reg<T>*>(dst) = pack<T>(lo, hi);
}

// Stores a warp's 16 × D accumulators (times `factor`) to rows r0.. of a [len, D] matrix.
template <typename T, int D>
__device__ __forceinline__ void store_rows(T* dst, const float (&acc)[D / 8][4], const float (&factor)[2], int r0,
                                           int len, int lane) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = r0 + acc_row(lane, 2 * h);
        if (r >= len) continue;
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
            store_pair<T>(dst + (size_t)r * D + n * 8 + acc_col(lane, 2 * h), acc[n][2 * h] * factor[h],
                          acc[n][2 * h + 1] * factor[h]);
    }
}

template <typename T, int D>
constexpr int forward_smem_bytes() {
    return (ROWS + 4 * FORWARD_COLS<D>) * D * (int)sizeof(T);
}

// O = softmax(scale · Q Kᵀ + mask) V and the row log-sum-exp. Shared: Q [ROWS][D], then K and V
// [2][C][D] each.
template <typename T, int D>
__global__ void __launch_bounds__(THREADS)
    forward_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
                   float* __restrict__ lse, Bd3Layout l, float scale) {
    constexpr int C = FORWARD_COLS<D>;
    T* qs = shared_memory<T>();
    T* ks = qs + ROWS * D;
    T* vs = ks + 2 * C * D;
    const size_t bh = blockIdx.y;
    q += bh * l.sq * D;
    out += bh * l.sq * D;
    k += bh * l.sk * D;
    v += bh * l.sk * D;
    lse += bh * l.sq;
    const int q0 = blockIdx.x * ROWS, q1 = min(q0 + ROWS, l.sq);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, w0 = q0 + 16 * warp;

    int k0 = next_tile<C>(l, true, q0, q1, 0);
    load_rows<T, D, ROWS>(qs, q, q0, l.sq);
    if (k0 < l.sk) {
        load_rows<T, D, C>(ks, k, k0, l.sk);
        load_rows<T, D, C>(vs, v, k0, l.sk);
    }
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    Reg<T> qf[D / 16][4];
    load_a<T, D>(qf, qs, 16 * warp, lane);

    float o[D / 8][4];
    zero(o);
    float m[2] = {-INFINITY, -INFINITY}, sum[2] = {0.f, 0.f};  // per owned row (groupID, +8)
    for (int buf = 0; k0 < l.sk; buf ^= 1) {
        const int kind = bd3_classify(l, q0, q1, k0, min(k0 + C, l.sk));
        const int next = next_tile<C>(l, true, q0, q1, k0 + C);
        if (next < l.sk) {  // into the other buffer, which everyone finished reading (barrier below)
            load_rows<T, D, C>(ks + (buf ^ 1) * C * D, k, next, l.sk);
            load_rows<T, D, C>(vs + (buf ^ 1) * C * D, v, next, l.sk);
        }
        cp_async_commit();

        float s[C / 8][4];
        zero(s);
        mma_abt<T, D, C>(s, qf, ks + buf * C * D, lane);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float tile_max = -INFINITY;
#pragma unroll
            for (int j = 0; j < C / 8; ++j)
#pragma unroll
                for (int e = 2 * h; e < 2 * h + 2; ++e) {
                    const bool ok = seen(l, kind, w0 + acc_row(lane, e), k0 + 8 * j + acc_col(lane, e));
                    s[j][e] = ok ? s[j][e] * scale : -INFINITY;
                    tile_max = fmaxf(tile_max, s[j][e]);
                }
            const float m_new = fmaxf(m[h], group_max(tile_max));
            // A row that has seen nothing yet (m_new = -inf) keeps zero probabilities.
            const float correction = m_new == -INFINITY ? 1.f : __expf(m[h] - m_new);
            float row_sum = 0.f;
#pragma unroll
            for (int j = 0; j < C / 8; ++j)
#pragma unroll
                for (int e = 2 * h; e < 2 * h + 2; ++e) {
                    s[j][e] = m_new == -INFINITY ? 0.f : __expf(s[j][e] - m_new);
                    row_sum += s[j][e];
                }
            sum[h] = sum[h] * correction + row_sum;  // this lane's share; summed over the group at the end
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                o[n][2 * h] *= correction;
                o[n][2 * h + 1] *= correction;
            }
            m[h] = m_new;
        }
        mma_ab<T, D, C>(o, s, vs + buf * C * D, lane);

        cp_async_wait_all();
        __syncthreads();
        k0 = next;
    }

    float inv[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        sum[h] = group_sum(sum[h]);
        inv[h] = sum[h] > 0.f ? 1.f / sum[h] : 0.f;
        const int r = w0 + acc_row(lane, 2 * h);
        // +inf for a row that saw nothing makes every backward probability exp(s − lse) zero.
        if (lane % 4 == 0 && r < l.sq) lse[r] = sum[h] > 0.f ? m[h] + logf(sum[h]) : INFINITY;
    }
    store_rows<T, D>(out, o, inv, w0, l.sq, lane);
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

// Shared memory of each backward kernel: two owned [ROWS][D] tiles, two streamed [2][C][D] tiles,
// and (dK/dV) the streamed rows' lse and delta, [2][C] fp32 each.
template <typename T, int D>
constexpr int backward_smem_bytes() {
    return (2 * ROWS + 4 * BACKWARD_COLS<D>) * D * (int)sizeof(T) + 4 * BACKWARD_COLS<D> * (int)sizeof(float);
}

// P and dS of one tile from the scores S and dP (both 16 × C accumulators of the warp), in place:
// s becomes P = exp(scale·S − lse) (0 where hidden), dp becomes dS = P ∘ (dP − delta). `queries`
// says whether the accumulator rows are queries (dQ) or keys (dK/dV, the columns are queries).
template <int C>
__device__ __forceinline__ void softmax_grad(float (&s)[C / 8][4], float (&dp)[C / 8][4], const Bd3Layout& l,
                                             int kind, int row0, int col0, bool queries, const float* row_lse,
                                             const float* row_delta, const float* col_lse, const float* col_delta,
                                             float scale, int lane) {
#pragma unroll
    for (int j = 0; j < C / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int r = acc_row(lane, e), c = 8 * j + acc_col(lane, e);
            const int qi = queries ? row0 + r : col0 + c, ki = queries ? col0 + c : row0 + r;
            const float lse_i = queries ? row_lse[e / 2] : col_lse[c];
            const float delta_i = queries ? row_delta[e / 2] : col_delta[c];
            const float p = seen(l, kind, qi, ki) ? __expf(s[j][e] * scale - lse_i) : 0.f;
            s[j][e] = p;
            dp[j][e] = p * (dp[j][e] - delta_i);
        }
}

// dQ_i = scale · Σ_j P_ij (dP_ij − delta_i) K_j, one thread block per query tile.
template <typename T, int D>
__global__ void __launch_bounds__(THREADS) grad_q_kernel(Backward<T> a, Bd3Layout l, float scale) {
    constexpr int C = BACKWARD_COLS<D>;
    T* qs = shared_memory<T>();
    T* dos = qs + ROWS * D;
    T* ks = dos + ROWS * D;
    T* vs = ks + 2 * C * D;
    a.at_head(blockIdx.y, l, D);
    const int q0 = blockIdx.x * ROWS, q1 = min(q0 + ROWS, l.sq);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, w0 = q0 + 16 * warp;

    int k0 = next_tile<C>(l, true, q0, q1, 0);
    load_rows<T, D, ROWS>(qs, a.q, q0, l.sq);
    load_rows<T, D, ROWS>(dos, a.dout, q0, l.sq);
    if (k0 < l.sk) {
        load_rows<T, D, C>(ks, a.k, k0, l.sk);
        load_rows<T, D, C>(vs, a.v, k0, l.sk);
    }
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    Reg<T> qf[D / 16][4], dof[D / 16][4];
    load_a<T, D>(qf, qs, 16 * warp, lane);
    load_a<T, D>(dof, dos, 16 * warp, lane);
    float row_lse[2], row_delta[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = w0 + acc_row(lane, 2 * h);
        row_lse[h] = r < l.sq ? a.lse[r] : INFINITY;
        row_delta[h] = r < l.sq ? a.delta[r] : 0.f;
    }

    float dq[D / 8][4];
    zero(dq);
    for (int buf = 0; k0 < l.sk; buf ^= 1) {
        const int kind = bd3_classify(l, q0, q1, k0, min(k0 + C, l.sk));
        const int next = next_tile<C>(l, true, q0, q1, k0 + C);
        if (next < l.sk) {
            load_rows<T, D, C>(ks + (buf ^ 1) * C * D, a.k, next, l.sk);
            load_rows<T, D, C>(vs + (buf ^ 1) * C * D, a.v, next, l.sk);
        }
        cp_async_commit();

        float s[C / 8][4], dp[C / 8][4];
        zero(s);
        zero(dp);
        mma_abt<T, D, C>(s, qf, ks + buf * C * D, lane);
        mma_abt<T, D, C>(dp, dof, vs + buf * C * D, lane);
        softmax_grad<C>(s, dp, l, kind, w0, k0, true, row_lse, row_delta, nullptr, nullptr, scale, lane);
        mma_ab<T, D, C>(dq, dp, ks + buf * C * D, lane);

        cp_async_wait_all();
        __syncthreads();
        k0 = next;
    }
    const float factor[2] = {scale, scale};
    store_rows<T, D>(a.dq, dq, factor, w0, l.sq, lane);
}

// dV_j = Σ_i P_ij dO_i and dK_j = scale · Σ_i P_ij (dP_ij − delta_i) Q_i, one thread block per
// key tile; the warps compute Pᵀ and dSᵀ (keys × queries) directly.
template <typename T, int D>
__global__ void __launch_bounds__(THREADS) grad_kv_kernel(Backward<T> a, Bd3Layout l, float scale) {
    constexpr int C = BACKWARD_COLS<D>;
    T* ks = shared_memory<T>();
    T* vs = ks + ROWS * D;
    T* qs = vs + ROWS * D;
    T* dos = qs + 2 * C * D;
    float* lses = reinterpret_cast<float*>(dos + 2 * C * D);
    float* deltas = lses + 2 * C;
    a.at_head(blockIdx.y, l, D);
    const int k0 = blockIdx.x * ROWS, k1 = min(k0 + ROWS, l.sk);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, w0 = k0 + 16 * warp;

    // lse and delta of streamed queries r0.. into buffer `buf` (plain stores: visible after the
    // barrier that also publishes the cp.async data).
    auto load_row_terms = [&](int buf, int r0) {
        for (int i = threadIdx.x; i < C; i += THREADS) {
            const int r = r0 + i;
            lses[buf * C + i] = r < l.sq ? a.lse[r] : INFINITY;
            deltas[buf * C + i] = r < l.sq ? a.delta[r] : 0.f;
        }
    };
    int q0 = next_tile<C>(l, false, k0, k1, 0);
    load_rows<T, D, ROWS>(ks, a.k, k0, l.sk);
    load_rows<T, D, ROWS>(vs, a.v, k0, l.sk);
    if (q0 < l.sq) {
        load_rows<T, D, C>(qs, a.q, q0, l.sq);
        load_rows<T, D, C>(dos, a.dout, q0, l.sq);
        load_row_terms(0, q0);
    }
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    Reg<T> kf[D / 16][4], vf[D / 16][4];
    load_a<T, D>(kf, ks, 16 * warp, lane);
    load_a<T, D>(vf, vs, 16 * warp, lane);

    float dk[D / 8][4], dv[D / 8][4];
    zero(dk);
    zero(dv);
    for (int buf = 0; q0 < l.sq; buf ^= 1) {
        const int kind = bd3_classify(l, q0, min(q0 + C, l.sq), k0, k1);
        const int next = next_tile<C>(l, false, k0, k1, q0 + C);
        if (next < l.sq) {
            load_rows<T, D, C>(qs + (buf ^ 1) * C * D, a.q, next, l.sq);
            load_rows<T, D, C>(dos + (buf ^ 1) * C * D, a.dout, next, l.sq);
            load_row_terms(buf ^ 1, next);
        }
        cp_async_commit();

        float s[C / 8][4], dp[C / 8][4];
        zero(s);
        zero(dp);
        mma_abt<T, D, C>(s, kf, qs + buf * C * D, lane);   // Sᵀ = K Qᵀ
        mma_abt<T, D, C>(dp, vf, dos + buf * C * D, lane);  // dPᵀ = V dOᵀ
        softmax_grad<C>(s, dp, l, kind, w0, q0, false, nullptr, nullptr, lses + buf * C, deltas + buf * C, scale,
                        lane);
        mma_ab<T, D, C>(dv, s, dos + buf * C * D, lane);  // dV += Pᵀ dO
        mma_ab<T, D, C>(dk, dp, qs + buf * C * D, lane);  // dK += dSᵀ Q

        cp_async_wait_all();
        __syncthreads();
        q0 = next;
    }
    const float dk_factor[2] = {scale, scale}, one[2] = {1.f, 1.f};
    store_rows<T, D>(a.dk, dk, dk_factor, w0, l.sk, lane);
    store_rows<T, D>(a.dv, dv, one, w0, l.sk, lane);
}
