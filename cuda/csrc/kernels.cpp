// The model's fused element-wise kernels, written once as CUDA C++ source: compiled at run
// time by libtorch's jiterator (NVRTC behind TensorIterator: any strides, bf16 or float32,
// vectorised loads, compiled once per dtype and cached) and wrapped as autograd functions
// here; the same source is also compiled by the host compiler into this shim, and the same
// autograd functions run it element by element on CPU tensors, so that a machine without a
// GPU checks what they compute (cuda/src/kernels.rs tests them against the reference
// formulas and autograd).
//
// SwiGLU: silu(gate) * up, forward one kernel where the reference launches two (silu, then
// the product, each rounding to bf16), backward one kernel for both gradients where the
// reference launches five; it saves gate and up for the backward instead of also silu(gate).
//
// RoPE: each pair (a, b) of a head's features rotated by its position's angle. The reference
// makes six passes over q or k (a cast to float32, the pair swap, two products, the sum, the
// cast back), each reading or writing float32, and as many backward. Here one kernel rotates
// the pairs (its two outputs are the pairs' first and second elements, in float32 as the
// reference computes them) and two copies interleave them back into the activations' kind;
// the backward is the inverse rotation, the same way, and needs only the tables.
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

// (a, b) -> (a·cos − b·sin, b·cos + a·sin), in float32.
#define LILLM_ROPE_FORWARD                                                    \
  template <typename T>                                                       \
  void lillm_rope_forward(T a, T b, T cosine, T sine, T& out_a, T& out_b) { \
    float fa = static_cast<float>(a), fb = static_cast<float>(b);            \
    float c = static_cast<float>(cosine), s = static_cast<float>(sine);    \
    out_a = static_cast<T>(fa * c - fb * s);                                  \
    out_b = static_cast<T>(fb * c + fa * s);                                  \
  }

// The rotation's transpose (its inverse) applied to the output's gradient.
#define LILLM_ROPE_BACKWARD                                                   \
  template <typename T>                                                       \
  void lillm_rope_backward(T grad_a, T grad_b, T cosine, T sine, T& d_a, T& d_b) { \
    float ga = static_cast<float>(grad_a), gb = static_cast<float>(grad_b);  \
    float c = static_cast<float>(cosine), s = static_cast<float>(sine);    \
    d_a = static_cast<T>(ga * c + gb * s);                                    \
    d_b = static_cast<T>(gb * c - ga * s);                                    \
  }

namespace {
LILLM_SWIGLU_FORWARD
LILLM_SWIGLU_BACKWARD
LILLM_ROPE_FORWARD
LILLM_ROPE_BACKWARD

using lillm_shim::fail;

const char* kSwigluForward = LILLM_SOURCE(LILLM_SWIGLU_FORWARD);
const char* kSwigluBackward = LILLM_SOURCE(LILLM_SWIGLU_BACKWARD);
const char* kRopeForward = LILLM_SOURCE(LILLM_ROPE_FORWARD);
const char* kRopeBackward = LILLM_SOURCE(LILLM_ROPE_BACKWARD);

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

extern "C" __global__ void lillm_check_rope(const float* a, const float* b, const float* cosine,
                                            const float* sine, float* out_a, float* out_b,
                                            float* d_a, float* d_b) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  float ra, rb, da, db;
  lillm_rope_forward<float>(a[i], b[i], cosine[i], sine[i], ra, rb);
  lillm_rope_backward<float>(a[i], b[i], cosine[i], sine[i], da, db);
  out_a[i] = ra;
  out_b[i] = rb;
  d_a[i] = da;
  d_b[i] = db;
}
)";

// A kernel function as both compilers see it: its source and name for jiterator, how many
// inputs and outputs it has, and the same function compiled for the host, on float32.
struct Kernel {
  const char* source;
  const char* name;
  int inputs;
  int outputs;
  bool return_by_ref;
  void (*host)(const float* in, float* out);
};

const Kernel kSwigluForwardKernel{
    kSwigluForward, "lillm_swiglu_forward", 2, 1, false,
    [](const float* in, float* out) { out[0] = lillm_swiglu_forward<float>(in[0], in[1]); }};
const Kernel kSwigluBackwardKernel{
    kSwigluBackward, "lillm_swiglu_backward", 3, 2, true, [](const float* in, float* out) {
      lillm_swiglu_backward<float>(in[0], in[1], in[2], out[0], out[1]);
    }};
const Kernel kRopeForwardKernel{
    kRopeForward, "lillm_rope_forward", 4, 2, true, [](const float* in, float* out) {
      lillm_rope_forward<float>(in[0], in[1], in[2], in[3], out[0], out[1]);
    }};
const Kernel kRopeBackwardKernel{
    kRopeBackward, "lillm_rope_backward", 4, 2, true, [](const float* in, float* out) {
      lillm_rope_backward<float>(in[0], in[1], in[2], in[3], out[0], out[1]);
    }};

// The host's stand-in for jiterator: `kernel`'s host function element by element over the
// inputs broadcast together, in float32, its outputs in the inputs' promoted dtype as
// jiterator gives them. Slow; it exists so that a CPU test runs the autograd functions below.
c10::SmallVector<at::Tensor> host_launch(const Kernel& kernel,
                                         const c10::SmallVector<at::Tensor>& inputs) {
  auto dtype = inputs[0].scalar_type();
  for (const auto& t : inputs) dtype = at::promote_types(dtype, t.scalar_type());
  auto broadcast = at::broadcast_tensors(std::vector<at::Tensor>(inputs.begin(), inputs.end()));
  std::vector<at::Tensor> in;
  for (const auto& t : broadcast) in.push_back(t.to(at::kFloat).contiguous());
  std::vector<at::Tensor> out;
  for (int i = 0; i < kernel.outputs; ++i) out.push_back(at::empty_like(in[0]));
  std::vector<const float*> from;
  for (const auto& t : in) from.push_back(t.data_ptr<float>());
  std::vector<float*> to;
  for (auto& t : out) to.push_back(t.data_ptr<float>());
  std::vector<float> args(kernel.inputs), results(kernel.outputs);
  for (int64_t e = 0; e < in[0].numel(); ++e) {
    for (int i = 0; i < kernel.inputs; ++i) args[i] = from[i][e];
    kernel.host(args.data(), results.data());
    for (int i = 0; i < kernel.outputs; ++i) to[i][e] = results[i];
  }
  c10::SmallVector<at::Tensor> typed;
  for (auto& t : out) typed.push_back(t.to(dtype));
  return typed;
}

// `kernel` over `inputs`: compiled and launched by jiterator on CUDA, on the host elsewhere.
c10::SmallVector<at::Tensor> launch(const Kernel& kernel,
                                    const c10::SmallVector<at::Tensor>& inputs) {
  TORCH_CHECK(static_cast<int>(inputs.size()) == kernel.inputs, kernel.name, " takes ",
              kernel.inputs, " inputs");
#ifdef LILLM_WITH_CUDA
  if (inputs[0].is_cuda()) {
    return at::cuda::CompileAndLaunchKernel(kernel.source, kernel.name, kernel.outputs, inputs,
                                            {}, kernel.return_by_ref);
  }
#endif
  return host_launch(kernel, inputs);
}

struct SwiGlu : public torch::autograd::Function<SwiGlu> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& gate,
                            const at::Tensor& up) {
    ctx->save_for_backward({gate, up});
    return launch(kSwigluForwardKernel, {gate, up})[0];
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    auto saved = ctx->get_saved_variables();
    auto out = launch(kSwigluBackwardKernel, {grads[0], saved[0], saved[1]});
    return {out[0], out[1]};
  }
};

// `x` (…, n) as its pairs' first and second elements: two views (…, n/2), no copy when the
// last dimension is contiguous (it is for q and k and their gradients).
std::pair<at::Tensor, at::Tensor> pair_halves(const at::Tensor& x) {
  auto shape = x.sizes().vec();
  shape.back() /= 2;
  shape.push_back(2);
  auto pairs = x.reshape(shape);
  return {pairs.select(-1, 0), pairs.select(-1, 1)};
}

// A new contiguous tensor of `like`'s shape and dtype whose pairs are (first, second).
at::Tensor interleave(const at::Tensor& first, const at::Tensor& second, const at::Tensor& like) {
  auto out = at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
  auto halves = pair_halves(out);
  halves.first.copy_(first);
  halves.second.copy_(second);
  return out;
}

struct Rope : public torch::autograd::Function<Rope> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& cos, const at::Tensor& sin) {
    ctx->save_for_backward({cos, sin});
    auto halves = pair_halves(x);
    auto out = launch(kRopeForwardKernel, {halves.first, halves.second, cos, sin});
    return interleave(out[0], out[1], x);
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    auto saved = ctx->get_saved_variables();
    auto halves = pair_halves(grads[0]);
    auto out = launch(kRopeBackwardKernel, {halves.first, halves.second, saved[0], saved[1]});
    return {interleave(out[0], out[1], grads[0]), at::Tensor(), at::Tensor()};
  }
};

at::Tensor& tensor(void* raw) { return *static_cast<at::Tensor*>(raw); }

// Runs `make` (which returns the result tensor) for the C ABI: a new tensor for the caller to
// own, or null with `err` set (free it with lillm_cuda_free_error).
template <typename F>
void* new_tensor(char** err, F make) {
  try {
    return new at::Tensor(make());
  } catch (const std::exception& e) {
    fail(err, e.what());
    return nullptr;
  }
}

at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type(),
              "the fused SwiGLU needs gate and up of one shape and dtype");
  return SwiGlu::apply(gate, up);
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() > 0 && x.size(-1) % 2 == 0, "the fused RoPE rotates pairs: the last ",
              "dimension must be even, not ", x.sizes());
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "the fused RoPE takes float32 angle tables");
  return Rope::apply(x, cos, sin);
}

// Refuses what is not on CUDA (the host path is for tests, through the _host entries).
void require_cuda(std::initializer_list<const at::Tensor*> tensors, const char* what) {
#ifndef LILLM_WITH_CUDA
  (void)tensors;
  TORCH_CHECK(false, what, ": this torch build has no CUDA");
#endif
  for (auto t : tensors) TORCH_CHECK(t->is_cuda(), what, " runs on CUDA tensors");
}
}  // namespace

extern "C" {

// silu(gate) * up for CUDA tensors of one shape and dtype, with its backward.
void* lillm_cuda_swiglu(void* gate, void* up, char** err) {
  return new_tensor(err, [&] {
    require_cuda({&tensor(gate), &tensor(up)}, "the fused SwiGLU");
    return swiglu(tensor(gate), tensor(up));
  });
}

// `x` (…, n) with each pair of its last dimension rotated by the float32 angle tables `cos`
// and `sin` (broadcastable to (…, n/2)), with its backward; a new tensor of x's shape and
// dtype.
void* lillm_cuda_rope(void* x, void* cos, void* sin, char** err) {
  return new_tensor(err, [&] {
    require_cuda({&tensor(x), &tensor(cos), &tensor(sin)}, "the fused RoPE");
    return rope(tensor(x), tensor(cos), tensor(sin));
  });
}

// The same autograd functions on CPU tensors, each kernel function compiled for the host and
// run element by element: what the tests check the wrappers' plumbing and arithmetic with.
void* lillm_cuda_swiglu_host(void* gate, void* up, char** err) {
  return new_tensor(err, [&] { return swiglu(tensor(gate), tensor(up)); });
}

void* lillm_cuda_rope_host(void* x, void* cos, void* sin, char** err) {
  return new_tensor(err, [&] { return rope(tensor(x), tensor(cos), tensor(sin)); });
}

// Every kernel's source with a kernel that calls it as jiterator does, for NVRTC to compile
// without a GPU (lillm_cuda_nvrtc_ptx). Free it with lillm_cuda_free_error.
char* lillm_cuda_kernels_source() {
  std::string all;
  for (const char* part :
       {kSwigluForward, kSwigluBackward, kRopeForward, kRopeBackward, kJiteratorCalls}) {
    all += std::string(part) + "\n";
  }
  return strdup(all.c_str());
}

}  // extern "C"
