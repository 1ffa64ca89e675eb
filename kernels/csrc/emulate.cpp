// The tensor-core kernels of kernels.cuh on the CPU, so that their arithmetic and their fragment
// indexing are tested without a GPU (kernels/tests/tensor_cores.rs compares them with the dense
// reference). This file is the host side of the warp-level interface flash.cu implements in PTX:
//
// - Each thread of a block is a fiber (its own stack, switched in user space: a few instructions
//   of assembly on x86-64, POSIX ucontext elsewhere); the block runs on the calling OS thread. __syncthreads waits for every thread of the block, each warp-level
//   primitive for the 32 lanes of its warp, as on the GPU.
// - mma_16816, ldmatrix_x4(_trans) and __shfl_xor_sync are collective: every lane deposits what it
//   holds, the warp meets, and every lane takes its result from the others' deposits, placing
//   elements exactly as the PTX ISA's fragment layouts say. A kernel that indexes a fragment wrongly
//   therefore computes wrong numbers here, as it would on the GPU.
// - cp.async copies are queued per thread and land at cp_async_wait_all, not before: a kernel that
//   reads a tile before waiting reads stale data.
// - Element types: fp32 (no rounding: the arithmetic itself), and bf16 and fp16 stored as 16-bit
//   values with round-to-nearest-even conversions (bf16 by bit arithmetic, fp16 by _Float16), so
//   inputs, the P and dS operands of the second products, and the outputs round as on the GPU.
//   Products are accumulated in double and rounded once to fp32 per mma (the tensor cores keep at
//   least fp32 precision inside; their exact internal rounding is not modelled).
//
// What this does not check: timing, the memory model beyond cp.async ordering, bank conflicts,
// register and shared-memory limits, the PTX itself (flash.cu's inline assembly is compiled by
// nvcc in `make test` but runs only on a GPU).

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ucontext.h>

#include "flash.h"

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)

namespace {

// --- Element types ---------------------------------------------------------------------------

struct Bf16 {
    uint16_t bits;
};
struct F16 {
    _Float16 value;
};

float to_f(float x) { return x; }
float to_f(Bf16 x) {
    const uint32_t u = (uint32_t)x.bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
float to_f(F16 x) { return (float)x.value; }

template <typename T>
T from_f(float x);
template <>
float from_f<float>(float x) {
    return x;
}
template <>
Bf16 from_f<Bf16>(float x) {  // round to nearest, ties to even; NaN stays NaN
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if (std::isnan(x)) return Bf16{(uint16_t)((u >> 16) | 0x40)};
    u += 0x7fff + ((u >> 16) & 1);
    return Bf16{(uint16_t)(u >> 16)};
}
template <>
F16 from_f<F16>(float x) {
    return F16{(_Float16)x};
}

template <typename T>
struct Reg {
    T lo, hi;
};
template <typename T>
Reg<T> pack(float lo, float hi) {
    return Reg<T>{from_f<T>(lo), from_f<T>(hi)};
}

// --- Fibers ----------------------------------------------------------------------------------

constexpr int kMaxThreads = 128;
constexpr size_t kStackBytes = 256 * 1024;

enum class State { Ready, AtWarp, AtBlock, Done };

struct Lane {
    float a[8], b[4];     // mma operands, as floats (exact for every element type)
    const void* row;      // ldmatrix row address
    float value;          // shuffle
};

struct PendingCopy {
    void* dst;
    const void* src;
    size_t bytes;
    bool valid;
};

// Where a suspended fiber (or the scheduler) resumes. x86-64 uses the assembly switch below
// (a few instructions); elsewhere, or with BD3_EMULATION_UCONTEXT, POSIX ucontext (portable, but a
// system call per switch for the signal mask: several times slower).
#if defined(__x86_64__) && !defined(BD3_EMULATION_UCONTEXT)
#define BD3_FIBER_ASM 1
struct Context {
    void* sp = nullptr;
};
#else
struct Context {
    ucontext_t uc;
};
#endif

struct Thread {
    Context context;
    std::unique_ptr<char[]> stack;
    State state = State::Done;
    int parity = 0;  // which exchange buffer the next warp-level operation uses
    std::vector<PendingCopy> open;
    std::vector<std::vector<PendingCopy>> committed;
};

struct Dim {
    unsigned x = 0, y = 0, z = 0;
};

struct Block {
    Thread threads[kMaxThreads];
    int current = -1;
    Context scheduler;
    const std::function<void()>* body = nullptr;
    Dim block_index;
    // Two exchange buffers per warp: a lane writes buffer p for one operation, and can only write
    // it again two warp barriers later, when every lane has read it.
    Lane exchange[2][kMaxThreads / 32][32];
    std::vector<unsigned char> shared;
};

thread_local Block* g_block = nullptr;

}  // namespace

#ifdef BD3_FIBER_ASM
// Saves the callee-saved registers and the stack pointer into *from, switches to the stack `to`
// (saved by an earlier switch, or prepared by start_context), restores and returns there.
extern "C" void bd3_fiber_switch(void** from, void* to);
asm(R"(
    .text
    .globl bd3_fiber_switch
    .type bd3_fiber_switch, @function
bd3_fiber_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size bd3_fiber_switch, .-bd3_fiber_switch
    .section .note.GNU-stack,"",@progbits
    .text
)");
#endif

namespace {

[[noreturn]] void fail(const char* what) {
    std::fprintf(stderr, "bd3 kernel emulation: %s\n", what);
    std::abort();
}

void switch_context(Context& from, Context& to) {
#ifdef BD3_FIBER_ASM
    bd3_fiber_switch(&from.sp, to.sp);
#else
    if (swapcontext(&from.uc, &to.uc) != 0) fail("swapcontext failed");
#endif
}

[[noreturn]] void fiber_entry() {
    Block& b = *g_block;
    (*b.body)();
    b.threads[b.current].state = State::Done;
    switch_context(b.threads[b.current].context, b.scheduler);
    fail("a finished thread was resumed");
}

// A context that starts fiber_entry on `stack`.
void start_context(Context& c, char* stack, size_t bytes) {
#ifdef BD3_FIBER_ASM
    // The first switch "returns" into fiber_entry with the ABI's alignment (rsp ≡ 8 mod 16 at a
    // function's entry), below six zeroed callee-saved registers.
    auto top = reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t(15);
    auto* slot = reinterpret_cast<void**>(top - 16);
    slot[0] = reinterpret_cast<void*>(&fiber_entry);
    slot[1] = nullptr;
    c.sp = reinterpret_cast<void*>(top - 16 - 6 * sizeof(void*));
#else
    if (getcontext(&c.uc) != 0) fail("getcontext failed");
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = bytes;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, reinterpret_cast<void (*)()>(&fiber_entry), 0);
#endif
}

// From a thread: wait at a barrier of kind `state`.
void wait_at(State state) {
    Block& b = *g_block;
    Thread& t = b.threads[b.current];
    t.state = state;
    switch_context(t.context, b.scheduler);
}

// Runs `body` as every thread of one block of `count` threads.
void run_block(Block& b, int count, const std::function<void()>& body) {
    b.body = &body;
    for (int i = 0; i < count; ++i) {
        Thread& t = b.threads[i];
        if (!t.stack) t.stack.reset(new char[kStackBytes]);
        start_context(t.context, t.stack.get(), kStackBytes);
        t.state = State::Ready;
        t.parity = 0;
        t.open.clear();
        t.committed.clear();
    }
    for (;;) {
        bool ran = false;
        for (int i = 0; i < count; ++i) {
            if (b.threads[i].state != State::Ready) continue;
            b.current = i;
            switch_context(b.scheduler, b.threads[i].context);
            ran = true;
        }
        b.current = -1;
        bool released = false;
        for (int w = 0; w * 32 < count; ++w) {
            bool all = true;
            for (int i = w * 32; i < w * 32 + 32 && i < count; ++i) all &= b.threads[i].state == State::AtWarp;
            if (!all) continue;
            for (int i = w * 32; i < w * 32 + 32 && i < count; ++i) b.threads[i].state = State::Ready;
            released = true;
        }
        int done = 0, at_block = 0;
        for (int i = 0; i < count; ++i) {
            done += b.threads[i].state == State::Done;
            at_block += b.threads[i].state == State::AtBlock;
        }
        if (done == count) return;
        if (at_block > 0 && at_block + done == count) {
            for (int i = 0; i < count; ++i)
                if (b.threads[i].state == State::AtBlock) b.threads[i].state = State::Ready;
            released = true;
        }
        if (!ran && !released) fail("deadlock: threads wait at barriers that can never complete");
    }
}

// --- What the kernels see --------------------------------------------------------------------

#define threadIdx (Dim{(unsigned)g_block->current, 0, 0})
#define blockIdx (g_block->block_index)

void __syncthreads() { wait_at(State::AtBlock); }

Lane& my_slot(int parity) {
    const int t = g_block->current;
    return g_block->exchange[parity][t / 32][t % 32];
}
const Lane& slot_of(int parity, int lane) { return g_block->exchange[parity][g_block->current / 32][lane]; }

// Deposit, meet the warp, collect: the shape of every warp-level operation.
template <typename Deposit, typename Collect>
void warp_collective(Deposit deposit, Collect collect) {
    Thread& t = g_block->threads[g_block->current];
    const int p = t.parity;
    t.parity ^= 1;
    deposit(my_slot(p));
    wait_at(State::AtWarp);
    collect(p);
}

float __shfl_xor_sync(unsigned, float x, int lane_mask) {
    float y = 0.f;
    warp_collective([&](Lane& s) { s.value = x; },
                    [&](int p) { y = slot_of(p, (g_block->current % 32) ^ lane_mask).value; });
    return y;
}

// glibc declares its own __expf; the kernels' one is the CUDA intrinsic, here exact.
#define __expf(x) std::exp(x)
using std::min;

// D += A·B for the warp's m16n8k16 product. Lane λ holds A registers a[r] = (A[row][col],
// A[row][col + 1]) with row = λ/4 + 8·(r % 2), col = 2·(λ % 4) + 8·(r / 2); B registers b[r] =
// (B[k][n], B[k + 1][n]) with k = 2·(λ % 4) + 8·r, n = λ/4; accumulator element i at row
// λ/4 + 8·(i / 2), column 2·(λ % 4) + i % 2 (PTX ISA, mma.m16n8k16 fragments).
template <typename T>
void mma_16816(float (&d)[4], const Reg<T> (&a)[4], Reg<T> b0, Reg<T> b1) {
    warp_collective(
        [&](Lane& s) {
            for (int r = 0; r < 4; ++r) {
                s.a[2 * r] = to_f(a[r].lo);
                s.a[2 * r + 1] = to_f(a[r].hi);
            }
            const Reg<T> b[2] = {b0, b1};
            for (int r = 0; r < 2; ++r) {
                s.b[2 * r] = to_f(b[r].lo);
                s.b[2 * r + 1] = to_f(b[r].hi);
            }
        },
        [&](int p) {
            auto A = [&](int row, int col) {
                const Lane& owner = slot_of(p, (row % 8) * 4 + (col % 8) / 2);
                return owner.a[2 * ((row / 8) + 2 * (col / 8)) + col % 2];
            };
            auto B = [&](int k, int n) {
                const Lane& owner = slot_of(p, n * 4 + (k % 8) / 2);
                return owner.b[2 * (k / 8) + k % 2];
            };
            const int lane = g_block->current % 32;
            for (int i = 0; i < 4; ++i) {
                const int row = lane / 4 + 8 * (i / 2), col = 2 * (lane % 4) + i % 2;
                double acc = d[i];
                for (int k = 0; k < 16; ++k) acc += (double)A(row, k) * (double)B(k, col);
                d[i] = (float)acc;
            }
        });
}

// ldmatrix .m8n8 .x4 .b16: lanes 8j..8j+7 give the addresses of rows 0..7 of matrix j; register j
// of lane λ receives row λ/4, columns 2·(λ % 4) and the next of matrix j — or, with .trans,
// rows 2·(λ % 4) and the next of column λ/4.
template <typename T>
void ldmatrix(Reg<T> (&r)[4], const T* row, bool trans) {
    warp_collective([&](Lane& s) { s.row = row; },
                    [&](int p) {
                        const int lane = g_block->current % 32;
                        for (int j = 0; j < 4; ++j) {
                            auto at = [&](int rr, int cc) {
                                return static_cast<const T*>(slot_of(p, 8 * j + rr).row)[cc];
                            };
                            const int g = lane / 4, c = 2 * (lane % 4);
                            r[j] = trans ? Reg<T>{at(c, g), at(c + 1, g)} : Reg<T>{at(g, c), at(g, c + 1)};
                        }
                    });
}
template <typename T>
void ldmatrix_x4(Reg<T> (&r)[4], const T* row) {
    ldmatrix(r, row, false);
}
template <typename T>
void ldmatrix_x4_trans(Reg<T> (&r)[4], const T* row) {
    ldmatrix(r, row, true);
}

template <typename T>
void cp_async_chunk(T* dst, const T* src, bool valid) {
    g_block->threads[g_block->current].open.push_back({dst, src, 8 * sizeof(T), valid});
}
void cp_async_commit() {
    Thread& t = g_block->threads[g_block->current];
    t.committed.push_back(std::move(t.open));
    t.open.clear();
}
void cp_async_wait_all() {
    for (auto& group : g_block->threads[g_block->current].committed)
        for (const PendingCopy& c : group) {
            if (c.valid) std::memcpy(c.dst, c.src, c.bytes);
            else std::memset(c.dst, 0, c.bytes);
        }
    g_block->threads[g_block->current].committed.clear();
}

template <typename T>
T* shared_memory() {
    return reinterpret_cast<T*>(g_block->shared.data());
}

}  // namespace

// The kernels as compiled for the GPU, and the test-only variant with a wrong accumulator
// fragment mapping (which the tests must catch).
namespace exact {
#include "kernels.cuh"
}
namespace wrong_fragment {
#define BD3_TEST_WRONG_FRAGMENT
#include "kernels.cuh"
#undef BD3_TEST_WRONG_FRAGMENT
}

namespace {

static_assert(exact::THREADS <= kMaxThreads, "the emulated block holds every thread");

// The shared-memory sizes count 2-byte elements on the GPU; the fp32 emulation needs twice that.
template <typename T>
size_t shared_bytes(int gpu_bytes) {
    return (size_t)gpu_bytes * (sizeof(T) >= 4 ? 2 : 1);
}

// Runs `kernel(block)` for every block of a grid_x × grid_y grid.
template <typename Kernel>
void run_grid(int grid_x, int grid_y, size_t shared, const Kernel& kernel) {
    static thread_local Block* block = new Block();  // fibers' stacks are reused across launches
    g_block = block;
    block->shared.assign(shared, 0);
    const std::function<void()> body = kernel;
    for (int y = 0; y < grid_y; ++y)
        for (int x = 0; x < grid_x; ++x) {
            block->block_index = Dim{(unsigned)x, (unsigned)y, 0};
            run_block(*block, exact::THREADS, body);
        }
    g_block = nullptr;
}

template <typename T, int D, bool Wrong>
void forward(const void* q, const void* k, const void* v, void* out, float* lse, int bh, Bd3Layout l, float scale) {
    using namespace exact;
    const int grid = (l.sq + ROWS - 1) / ROWS;
    const size_t smem = shared_bytes<T>(forward_smem_bytes<uint16_t, D>());
    auto args = std::make_tuple((const T*)q, (const T*)k, (const T*)v, (T*)out, lse, l, scale);
    run_grid(grid, bh, smem, [&] {
        if constexpr (Wrong) std::apply(wrong_fragment::forward_kernel<T, D>, args);
        else std::apply(forward_kernel<T, D>, args);
    });
}

template <typename T, int D, bool Wrong>
void backward(const void* q, const void* k, const void* v, const void* g, const float* lse, const float* delta,
              void* dq, void* dk, void* dv, int bh, Bd3Layout l, float scale) {
    using namespace exact;
    const size_t smem = shared_bytes<T>(backward_smem_bytes<uint16_t, D>());
    const T *tq = (const T*)q, *tk = (const T*)k, *tv = (const T*)v, *tg = (const T*)g;
    T *tdq = (T*)dq, *tdk = (T*)dk, *tdv = (T*)dv;
    if constexpr (Wrong) {
        const wrong_fragment::Backward<T> args{tq, tk, tv, tg, lse, delta, tdq, tdk, tdv};
        run_grid((l.sq + ROWS - 1) / ROWS, bh, smem, [&] { wrong_fragment::grad_q_kernel<T, D>(args, l, scale); });
        run_grid((l.sk + ROWS - 1) / ROWS, bh, smem, [&] { wrong_fragment::grad_kv_kernel<T, D>(args, l, scale); });
    } else {
        const Backward<T> args{tq, tk, tv, tg, lse, delta, tdq, tdk, tdv};
        run_grid((l.sq + ROWS - 1) / ROWS, bh, smem, [&] { grad_q_kernel<T, D>(args, l, scale); });
        run_grid((l.sk + ROWS - 1) / ROWS, bh, smem, [&] { grad_kv_kernel<T, D>(args, l, scale); });
    }
}

// Calls f.template operator()<T, D, Wrong>() for a supported combination; 1 otherwise.
template <typename F>
int dispatch(int variant, int dtype, int head_dim, F&& f) {
    auto with_type = [&](auto type) {
        using T = decltype(type);
        auto with_dim = [&](auto wrong) {
            if (head_dim == 64) return f.template operator()<T, 64, decltype(wrong)::value>(), 0;
            if (head_dim == 128) return f.template operator()<T, 128, decltype(wrong)::value>(), 0;
            return 1;
        };
        return variant == 0 ? with_dim(std::false_type{}) : with_dim(std::true_type{});
    };
    if (variant != 0 && variant != 1) return 1;
    switch (dtype) {
        case BD3_DTYPE_F16: return with_type(F16{});
        case BD3_DTYPE_BF16: return with_type(Bf16{});
        case BD3_DTYPE_F32: return with_type(float{});
        default: return 1;
    }
}

}  // namespace

extern "C" int bd3_emulate_forward(int variant, int dtype, int head_dim, const void* q, const void* k, const void* v,
                                   void* out, float* lse, int batch_heads, Bd3Layout layout, float scale) {
    return dispatch(variant, dtype, head_dim, [&]<typename T, int D, bool Wrong>() {
        forward<T, D, Wrong>(q, k, v, out, lse, batch_heads, layout, scale);
    });
}

extern "C" int bd3_emulate_backward(int variant, int dtype, int head_dim, const void* q, const void* k,
                                    const void* v, const void* grad_out, const float* lse, const float* delta,
                                    void* grad_q, void* grad_k, void* grad_v, int batch_heads, Bd3Layout layout,
                                    float scale) {
    return dispatch(variant, dtype, head_dim, [&]<typename T, int D, bool Wrong>() {
        backward<T, D, Wrong>(q, k, v, grad_out, lse, delta, grad_q, grad_k, grad_v, batch_heads, layout, scale);
    });
}

extern "C" int bd3_layout_classify(Bd3Layout layout, int q0, int q1, int k0, int k1) {
    return bd3_classify(layout, q0, q1, k0, k1);
}

extern "C" int bd3_layout_visible(Bd3Layout layout, int q, int k) { return bd3_visible(layout, q, k) ? 1 : 0; }
