// The kernels of kernels.cuh on the CPU, for fp32 inputs, so that their arithmetic — tiling, tile
// skipping, masks, online softmax, log-sum-exp, the backward — is tested without a GPU
// (kernels/tests/cuda.rs compares it with the dense reference). Thread blocks run one after the
// other; the THREADS threads of a block are std::threads that meet at a barrier for
// __syncthreads and at per-warp barriers for shuffles; __shared__ arrays become function statics,
// shared by the threads of the running block. Slow: small problems only.
//
// What this does not check: anything specific to the GPU (warp scheduling, the memory model,
// launch limits, fp16/bf16 conversions, the stream handling in autograd.cpp).

#include <algorithm>
#include <barrier>
#include <cmath>
#include <memory>
#include <thread>
#include <vector>

#include "flash.h"

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static

namespace {

struct Index {
    unsigned x = 0, y = 0, z = 0;
};
thread_local Index threadIdx, blockIdx;

constexpr int kWarps = 4;  // THREADS / 32, checked below
std::barrier<>* block_barrier = nullptr;
std::barrier<>* warp_barriers[kWarps] = {};
float warp_lanes[kWarps][32];

void __syncthreads() { block_barrier->arrive_and_wait(); }

float __shfl_xor_sync(unsigned, float x, int lane_mask) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    warp_lanes[warp][lane] = x;
    warp_barriers[warp]->arrive_and_wait();
    const float y = warp_lanes[warp][lane ^ lane_mask];
    warp_barriers[warp]->arrive_and_wait();  // nobody overwrites a lane before all have read
    return y;
}

float __expf(float x) { return std::exp(x); }
using std::min;

float to_f(float x) { return x; }
template <typename T>
T from_f(float x);
template <>
float from_f<float>(float x) {
    return x;
}

#include "kernels.cuh"

static_assert(THREADS == 32 * kWarps, "the emulated warps must cover the thread block");

// Runs `kernel` for every block of a grid_x × grid_y grid.
template <typename Kernel>
void run_grid(int grid_x, int grid_y, const Kernel& kernel) {
    for (int y = 0; y < grid_y; ++y) {
        for (int x = 0; x < grid_x; ++x) {
            std::barrier<> block(THREADS);
            std::vector<std::unique_ptr<std::barrier<>>> warps;
            block_barrier = &block;
            for (int w = 0; w < kWarps; ++w) {
                warps.push_back(std::make_unique<std::barrier<>>(32));
                warp_barriers[w] = warps.back().get();
            }
            std::vector<std::thread> threads;
            for (int t = 0; t < THREADS; ++t) {
                threads.emplace_back([&, t] {
                    threadIdx.x = t;
                    blockIdx.x = x;
                    blockIdx.y = y;
                    kernel();
                });
            }
            for (auto& t : threads) t.join();
        }
    }
}

template <int D>
void forward(const float* q, const float* k, const float* v, float* out, float* lse, int bh, Bd3Layout l,
             float scale) {
    run_grid((l.sq + ROWS - 1) / ROWS, bh, [&] { forward_kernel<float, D>(q, k, v, out, lse, l, scale); });
}

template <int D>
void backward(const Backward<float>& args, int bh, Bd3Layout l, float scale) {
    run_grid((l.sq + ROWS - 1) / ROWS, bh, [&] { grad_q_kernel<float, D>(args, l, scale); });
    run_grid((l.sk + ROWS - 1) / ROWS, bh, [&] { grad_kv_kernel<float, D>(args, l, scale); });
}

}  // namespace

// Same contract as bd3_flash_forward, fp32 on the host; returns 1 for an unsupported head dim.
extern "C" int bd3_emulate_forward(int head_dim, const float* q, const float* k, const float* v, float* out,
                                   float* lse, int batch_heads, Bd3Layout layout, float scale) {
    if (head_dim == 64) forward<64>(q, k, v, out, lse, batch_heads, layout, scale);
    else if (head_dim == 128) forward<128>(q, k, v, out, lse, batch_heads, layout, scale);
    else return 1;
    return 0;
}

// Same contract as bd3_flash_backward, fp32 on the host.
extern "C" int bd3_emulate_backward(int head_dim, const float* q, const float* k, const float* v,
                                    const float* grad_out, const float* lse, const float* delta, float* grad_q,
                                    float* grad_k, float* grad_v, int batch_heads, Bd3Layout layout, float scale) {
    const Backward<float> args{q, k, v, grad_out, lse, delta, grad_q, grad_k, grad_v};
    if (head_dim == 64) backward<64>(args, batch_heads, layout, scale);
    else if (head_dim == 128) backward<128>(args, batch_heads, layout, scale);
    else return 1;
    return 0;
}
