// The model's fused element-wise kernels, written once as CUDA C++ source: compiled at run
// time by libtorch's jiterator (NVRTC behind TensorIterator: any strides, bf16 or float32,
// vectorised loads, compiled once per dtype and cached) and wrapped as autograd functions
// here; the same source is also compiled by the host compiler into this shim, so that a
// machine without a GPU checks what it computes (cuda/src/kernels.rs tests it against the
// reference formulas).
//
// SwiGLU: silu(gate) * up, forward one kernel where the reference launches two (silu, then
// the product, each rounding to bf16), backward one kernel for both gradients where the
// reference launches five; it saves gate and up for the backward instead of also silu(gate).
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#include <torch/torch.h>

#include "shim_error.h"

#ifdef LILLM_WITH_CUDA
#include <ATen/cuda/jiterator.h>
#endif

#define LILLM_STRING(...) #__VA_ARGS__
#define LILLM_SOURCE(...) LILLM_STRING(__VA_ARGS__)

// Arithmetic in float32 whatever T is; one rounding to T at the end.
#define LILLM_SWIGLU_FORWARD                                                  \
  template <typename T>                                                       \
  T lillm_swiglu_forward(T gate, T up) {                                      \
    float g = static_cast<float>(gate);                                       \
    return static_cast<T>(g / (1.0f + expf(-g)) * static_cast<float>(up));    \
  }

// d/dg [g·σ(g)·u] = u·σ(g)·(1 + g·(1 − σ(g))); d/du = g·σ(g).
#define LILLM_SWIGLU_BACKWARD                                                 \
  template <typename T>                                                       \
  void lillm_swiglu_backward(T grad, T gate, T up, T& d_gate, T& d_up) {      \
    float dy = static_cast<float>(grad);                                      \
    float g = static_cast<float>(gate);                                       \
    float s = 1.0f / (1.0f + expf(-g));                                       \
    d_up = static_cast<T>(dy * g * s);                                        \
    d_gate = static_cast<T>(dy * static_cast<float>(up) * s * (1.0f + g * (1.0f - s))); \
  }

namespace {
LILLM_SWIGLU_FORWARD
LILLM_SWIGLU_BACKWARD

using lillm_shim::fail;

const char* kSwigluForward = LILLM_SOURCE(LILLM_SWIGLU_FORWARD);
const char* kSwigluBackward = LILLM_SOURCE(LILLM_SWIGLU_BACKWARD);

// Each kernel function called as jiterator calls it: on the compute type (float, for float32
// and bf16 tensors alike), outputs by reference where return_by_ref. Compiled with NVRTC on
// a machine without a GPU (nvrtc.cpp) to check the source compiles for the device.
const char* kJiteratorCalls = R"(
extern "C" __global__ void lillm_check_swiglu(const float* gate, const float* up,
                                              const float* grad, float* out, float* d_gate,
                                              float* d_up) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = lillm_swiglu_forward<float>(gate[i], up[i]);
  float dg, du;
  lillm_swiglu_backward<float>(grad[i], gate[i], up[i], dg, du);
  d_gate[i] = dg;
  d_up[i] = du;
}
)";

#ifdef LILLM_WITH_CUDA

struct SwiGlu : public torch::autograd::Function<SwiGlu> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& gate,
                            const at::Tensor& up) {
    ctx->save_for_backward({gate, up});
    return at::cuda::CompileAndLaunchKernel(kSwigluForward, "lillm_swiglu_forward", 1,
                                            {gate, up}, {}, /*return_by_ref=*/false)[0];
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    auto saved = ctx->get_saved_variables();
    auto out = at::cuda::CompileAndLaunchKernel(kSwigluBackward, "lillm_swiglu_backward", 2,
                                                {grads[0], saved[0], saved[1]}, {},
                                                /*return_by_ref=*/true);
    return {out[0], out[1]};
  }
};
#endif
}  // namespace

extern "C" {

// silu(gate) * up for CUDA tensors of one shape and dtype, with its backward; returns a new
// tensor for the caller to own, or null with `err` set (free it with lillm_cuda_free_error).
void* lillm_cuda_swiglu(void* gate, void* up, char** err) {
#ifdef LILLM_WITH_CUDA
  try {
    const auto& g = *static_cast<at::Tensor*>(gate);
    const auto& u = *static_cast<at::Tensor*>(up);
    TORCH_CHECK(g.is_cuda() && u.is_cuda(), "the fused SwiGLU runs on CUDA tensors");
    TORCH_CHECK(g.sizes() == u.sizes() && g.scalar_type() == u.scalar_type(),
                "the fused SwiGLU needs gate and up of one shape and dtype");
    return new at::Tensor(SwiGlu::apply(g, u));
  } catch (const std::exception& e) {
    fail(err, e.what());
    return nullptr;
  }
#else
  (void)gate; (void)up;
  fail(err, "this torch build has no CUDA");
  return nullptr;
#endif
}

// Every kernel's source with a kernel that calls it as jiterator does, for NVRTC to compile
// without a GPU (lillm_cuda_nvrtc_ptx). Free it with lillm_cuda_free_error.
char* lillm_cuda_kernels_source() {
  std::string all = std::string(kSwigluForward) + "\n" + kSwigluBackward + "\n" + kJiteratorCalls;
  return strdup(all.c_str());
}

// The kernels' source compiled for the host, in float32: what one element computes.
float lillm_cuda_swiglu_forward_host(float gate, float up) {
  return lillm_swiglu_forward<float>(gate, up);
}

void lillm_cuda_swiglu_backward_host(float grad, float gate, float up, float* d_gate,
                                     float* d_up) {
  lillm_swiglu_backward<float>(grad, gate, up, *d_gate, *d_up);
}

}  // extern "C"
