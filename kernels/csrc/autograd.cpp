// The fused block-diffusion attention as a libtorch autograd Function, and the C entry point the
// Rust crate calls (kernels/src/cuda.rs). Kept apart from flash.cu so that nvcc never parses
// libtorch's headers and the host compiler never parses CUDA device code.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/autograd/custom_function.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#include "flash.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

int dtype_code(const at::Tensor& t) {
    TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
                "bd3 fused attention supports fp16 and bf16, got ", t.scalar_type());
    return t.scalar_type() == at::kHalf ? BD3_DTYPE_F16 : BD3_DTYPE_BF16;
}

void check_cuda(cudaError_t err, const char* what) {
    TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

void check_launch(int err, const char* what) {
    TORCH_CHECK(err == 0, "bd3 ", what, " kernel launch failed: ", cudaGetErrorString((cudaError_t)err));
}

Bd3Layout layout_from(AutogradContext* ctx) {
    Bd3Layout l;
    l.kind = (int)ctx->saved_data["kind"].toInt();
    l.n = (int)ctx->saved_data["n"].toInt();
    l.block = (int)ctx->saved_data["block"].toInt();
    l.sq = (int)ctx->saved_data["sq"].toInt();
    l.sk = (int)ctx->saved_data["sk"].toInt();
    return l;
}

struct FlashAttention : public torch::autograd::Function<FlashAttention> {
    static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q_in, const at::Tensor& k_in,
                              const at::Tensor& v_in, Bd3Layout l) {
        TORCH_CHECK(q_in.is_cuda() && k_in.is_cuda() && v_in.is_cuda(), "bd3 fused attention needs CUDA tensors");
        TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.sizes() == k_in.sizes(),
                    "bd3 fused attention expects [batch, heads, len, head_dim] tensors");
        TORCH_CHECK(q_in.size(0) == k_in.size(0) && q_in.size(1) == k_in.size(1) && q_in.size(3) == k_in.size(3) &&
                        q_in.size(2) == l.sq && k_in.size(2) == l.sk,
                    "bd3 fused attention: shapes do not match the layout");
        TORCH_CHECK(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type(),
                    "bd3 fused attention: q, k, v dtypes differ");
        const c10::cuda::CUDAGuard guard(q_in.device());
        const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
        const int64_t batch_heads = q.size(0) * q.size(1), head_dim = q.size(3);
        const float scale = 1.0f / std::sqrt((float)head_dim);
        at::Tensor out = at::empty_like(q);
        at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
        check_launch(bd3_flash_forward(dtype_code(q), (int)head_dim, q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                       out.data_ptr(), lse.data_ptr<float>(), (int)batch_heads, l, scale,
                                       c10::cuda::getCurrentCUDAStream(q.device().index()).stream()),
                     "forward");
        ctx->save_for_backward({q, k, v, out, lse});
        ctx->saved_data["kind"] = (int64_t)l.kind;
        ctx->saved_data["n"] = (int64_t)l.n;
        ctx->saved_data["block"] = (int64_t)l.block;
        ctx->saved_data["sq"] = (int64_t)l.sq;
        ctx->saved_data["sk"] = (int64_t)l.sk;
        return out;
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        const auto saved = ctx->get_saved_variables();
        const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
        const c10::cuda::CUDAGuard guard(q.device());
        const at::Tensor grad_out = grads[0].to(q.scalar_type()).contiguous();
        // delta_i = Σ_d dO_id O_id, the row term of the softmax gradient, in fp32.
        const at::Tensor delta = (grad_out.to(at::kFloat) * out.to(at::kFloat)).sum(-1).contiguous();
        at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
        const int64_t head_dim = q.size(3);
        check_launch(bd3_flash_backward(dtype_code(q), (int)head_dim, q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                        grad_out.data_ptr(), lse.data_ptr<float>(), delta.data_ptr<float>(),
                                        dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), (int)(q.size(0) * q.size(1)),
                                        layout_from(ctx), 1.0f / std::sqrt((float)head_dim),
                                        c10::cuda::getCurrentCUDAStream(q.device().index()).stream()),
                     "backward");
        // No gradient for the layout argument.
        return {dq, dk, dv, at::Tensor()};
    }
};

char* copy_message(const char* text) {
    const size_t len = std::strlen(text) + 1;
    char* out = static_cast<char*>(std::malloc(len));
    if (out != nullptr) std::memcpy(out, text, len);
    return out;
}

// Runs `body`; returns nullptr, or the message of the exception it threw (free it with
// bd3_free_message). No C++ exception crosses the C boundary.
template <class Body>
char* guarded(Body body) {
    try {
        body();
        return nullptr;
    } catch (const std::exception& e) {
        return copy_message(e.what());
    } catch (...) {
        return copy_message("unknown C++ exception");
    }
}

}  // namespace

// Stores a new tensor in *out, or returns an error message.
extern "C" char* bd3_flash_attention(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v,
                                     Bd3Layout layout, at::Tensor** out) {
    return guarded([&] { *out = new at::Tensor(FlashAttention::apply(*q, *k, *v, layout)); });
}

// Makes `device` this thread's current CUDA device and stores libtorch's current stream on it
// (a cudaStream_t) in *stream: collectives enqueued there are ordered with libtorch's kernels.
extern "C" char* bd3_cuda_current_stream(int device, void** stream) {
    return guarded([&] {
        const auto index = static_cast<c10::DeviceIndex>(device);
        c10::cuda::set_device(index);
        *stream = c10::cuda::getCurrentCUDAStream(index).stream();
    });
}

// Waits until everything enqueued on libtorch's current stream of `device` has run.
extern "C" char* bd3_cuda_synchronize(int device) {
    return guarded([&] { c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).synchronize(); });
}

// Stores a stream of libtorch's pool on `device` (a cudaStream_t that does not synchronize with
// the default stream) in *stream: trainer::dist::nccl runs overlapped collectives there.
extern "C" char* bd3_cuda_pool_stream(int device, void** stream) {
    return guarded([&] {
        const auto index = static_cast<c10::DeviceIndex>(device);
        c10::cuda::set_device(index);
        *stream = c10::cuda::getStreamFromPool(/*isHighPriority=*/true, index).stream();
    });
}

// A CUDA event without timing (the cheapest kind) on `device`, stored in *event.
extern "C" char* bd3_cuda_event_create(int device, void** event) {
    return guarded([&] {
        c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
        cudaEvent_t e = nullptr;
        check_cuda(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
        *event = e;
    });
}

// Marks the point of `stream` that everything enqueued on it so far reaches.
extern "C" char* bd3_cuda_event_record(void* event, void* stream) {
    return guarded([&] {
        check_cuda(cudaEventRecord(static_cast<cudaEvent_t>(event), static_cast<cudaStream_t>(stream)),
                   "cudaEventRecord");
    });
}

// Makes work enqueued on `stream` from now on wait for `event` on the device, not on the host.
extern "C" char* bd3_cuda_stream_wait_event(void* stream, void* event) {
    return guarded([&] {
        check_cuda(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), static_cast<cudaEvent_t>(event), 0),
                   "cudaStreamWaitEvent");
    });
}

// *done = 1 when the device has passed `event` (created on `device`), 0 when not yet (never
// blocks). The device is made current first: a thread that never chose one (the collectives'
// watchdog) would otherwise create a context on device 0.
extern "C" char* bd3_cuda_event_query(int device, void* event, int* done) {
    return guarded([&] {
        const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
        const cudaError_t err = cudaEventQuery(static_cast<cudaEvent_t>(event));
        if (err == cudaErrorNotReady) {
            (void)cudaGetLastError();  // not-ready is not an error; keep it out of the next check
            *done = 0;
            return;
        }
        check_cuda(err, "cudaEventQuery");
        *done = 1;
    });
}

extern "C" void bd3_cuda_event_destroy(int device, void* event) {
    try {
        const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
        (void)cudaEventDestroy(static_cast<cudaEvent_t>(event));
    } catch (...) {
        // A device that cannot be made current (a CUDA error): the event is lost with it.
    }
}

extern "C" void bd3_free_message(char* message) { std::free(message); }
