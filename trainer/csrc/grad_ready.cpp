// A callback when backward has finished accumulating a parameter's gradient: a post hook on the
// parameter's AccumulateGrad node (what PyTorch DDP's reducer hooks too). trainer::dist::overlap
// uses it to start reducing a gradient bucket while backward goes on with earlier layers.
//
// The handle owns a strong reference to the AccumulateGrad node: the parameter holds it only
// weakly, and a node rebuilt at the next forward would have lost the hook.

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <cstdint>
#include <exception>
#include <memory>
#include <string>

namespace {

using bd3_ready_fn = void (*)(void* ctx, int64_t index);

struct GradReadyHook final : torch::autograd::FunctionPostHook {
  GradReadyHook(bd3_ready_fn fn, void* ctx, int64_t index) : fn(fn), ctx(ctx), index(index) {}

  torch::autograd::variable_list operator()(const torch::autograd::variable_list& grad_inputs,
                                            const torch::autograd::variable_list&) override {
    fn(ctx, index);
    return grad_inputs;
  }

  bd3_ready_fn fn;
  void* ctx;
  int64_t index;
};

struct Handle {
  std::shared_ptr<torch::autograd::Node> node;
  uintptr_t key;
};

thread_local std::string last_error;

}  // namespace

// Registers `fn(ctx, index)` to run after each backward accumulates into `param`'s gradient.
// Returns the handle to pass to bd3_grad_ready_hook_remove, or null (see bd3_grad_ready_error).
extern "C" void* bd3_grad_ready_hook_add(const at::Tensor* param, bd3_ready_fn fn, void* ctx, int64_t index) {
  try {
    auto node = torch::autograd::impl::grad_accumulator(*param);
    if (!node) {
      last_error = "the tensor is not a leaf that requires a gradient";
      return nullptr;
    }
    uintptr_t key = node->add_post_hook(std::make_unique<GradReadyHook>(fn, ctx, index));
    return new Handle{std::move(node), key};
  } catch (const std::exception& e) {
    last_error = e.what();
    return nullptr;
  }
}

extern "C" void bd3_grad_ready_hook_remove(void* handle) {
  auto* h = static_cast<Handle*>(handle);
  h->node->del_post_hook(h->key);
  delete h;
}

extern "C" const char* bd3_grad_ready_error() { return last_error.c_str(); }
