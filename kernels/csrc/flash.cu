// Fused block-diffusion attention on CUDA tensor cores: a FlashAttention-2-style forward (tiled,
// online softmax, saves the row log-sum-exp) and the matching backward, for fp16/bf16 inputs with
// fp32 accumulation and head dims 64 and 128 (kernels.cuh; sm_80 and later). This file supplies the
// hardware side of the small warp-level interface the kernels are written over — mma.sync
// m16n8k16, ldmatrix, cp.async — as inline PTX, and the launchers. emulate.cpp supplies the same
// interface on the CPU for the tests.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <math.h>

#include "flash.h"

namespace {

// A 32-bit register holding two elements (fp16 or bf16), the lower-indexed one in the low half.
template <typename T>
using Reg = uint32_t;

template <typename T>
__device__ __forceinline__ uint32_t pack(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack<__half>(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);  // .x = lo (low half), .y = hi
    return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8 × 8 b16 matrices; lanes 8j..8j+7 give the row addresses of matrix j, r[j] receives it
// (transposed with .trans).
#define BD3_LDMATRIX_X4(name, qualifiers)                                                   \
    template <typename T>                                                                  \
    __device__ __forceinline__ void name(uint32_t(&r)[4], const T* row) {                  \
        const unsigned addr = (unsigned)__cvta_generic_to_shared(row);                     \
        asm volatile("ldmatrix.sync.aligned.m8n8.x4" qualifiers ".shared.b16 {%0,%1,%2,%3}, [%4];\n" \
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])                       \
                     : "r"(addr));                                                          \
    }
BD3_LDMATRIX_X4(ldmatrix_x4, "")
BD3_LDMATRIX_X4(ldmatrix_x4_trans, ".trans")
#undef BD3_LDMATRIX_X4

// 16 bytes global → shared without passing through registers; zero-filled when !valid.
template <typename T>
__device__ __forceinline__ void cp_async_chunk(T* dst, const T* src, bool valid) {
    const unsigned addr = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

template <typename T>
__device__ __forceinline__ T* shared_memory() {
    extern __shared__ __align__(16) unsigned char bd3_smem[];
    return reinterpret_cast<T*>(bd3_smem);
}

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

// Launches `kernel` with `smem` bytes of dynamic shared memory (above the default 48 KiB at head
// dim 128, which needs the opt-in attribute).
template <typename... Params, typename... Args>
int launch(void (*kernel)(Params...), dim3 grid, int smem, void* stream, Args... args) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return (int)err;
    kernel<<<grid, THREADS, smem, (cudaStream_t)stream>>>(args...);
    return (int)cudaGetLastError();
}

}  // namespace

extern "C" int bd3_flash_forward(int dtype, int head_dim, const void* q, const void* k, const void* v, void* out,
                                 float* lse, int batch_heads, Bd3Layout layout, float scale, void* stream) {
    return dispatch(dtype, head_dim, batch_heads, layout, [&](auto config) {
        using T = typename decltype(config)::type;
        constexpr int D = decltype(config)::dim;
        const dim3 grid((layout.sq + ROWS - 1) / ROWS, batch_heads);
        return launch(forward_kernel<T, D>, grid, forward_smem_bytes<T, D>(), stream, (const T*)q, (const T*)k,
                      (const T*)v, (T*)out, lse, layout, scale);
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
        const int smem = backward_smem_bytes<T, D>();
        const int err = launch(grad_q_kernel<T, D>, dim3((layout.sq + ROWS - 1) / ROWS, batch_heads), smem, stream,
                               args, layout, scale);
        if (err != 0) return err;
        return launch(grad_kv_kernel<T, D>, dim3((layout.sk + ROWS - 1) / ROWS, batch_heads), smem, stream, args,
                      layout, scale);
    });
}
