// libtorch's fused multi-tensor AdamW behind a C ABI: one kernel launch (on CUDA) for every
// parameter, where the element-wise update written from Rust launches about ten per
// parameter. The tensors are tch's: pointers to at::Tensor, valid for the call.
#include <cstdlib>
#include <cstring>
#include <vector>

#include <torch/torch.h>

namespace {
std::vector<at::Tensor> tensors(void** list, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(*static_cast<at::Tensor*>(list[i]));
  return out;
}
}  // namespace

extern "C" {

// AdamW (decoupled weight decay) at optimizer step `step` (1 for the first update), in place
// on params, exp_avgs and exp_avg_sqs. Returns 0, or -1 with `err` set (free it with
// lillm_c10d_free_error).
int lillm_fused_adamw(void** params, void** grads, void** exp_avgs, void** exp_avg_sqs, size_t n,
                      double step, double lr, double beta1, double beta2, double weight_decay,
                      double eps, char** err) {
  try {
    auto p = tensors(params, n);
    auto g = tensors(grads, n);
    auto m = tensors(exp_avgs, n);
    auto v = tensors(exp_avg_sqs, n);
    // Every parameter is at the same step: one tensor serves them all (the kernel only
    // reads it), instead of a fill launched per parameter.
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> steps;
    if (n > 0) steps.assign(n, at::full({}, step, p[0].options().dtype(at::kFloat)));
    at::_fused_adamw_(p, g, m, v, {}, steps, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false);
    return 0;
  } catch (const std::exception& e) {
    *err = strdup(e.what());
    return -1;
  }
}

// Scales the gradients so that their global L2 norm is at most `max_norm` (0: never), with
// multi-tensor kernels (`_foreach_norm`, `_foreach_mul_`); returns the norm before clipping
// as a new 0-d tensor for the caller to own, or null with `err` set.
void* lillm_fused_clip_grad_norm(void** grads, size_t n, double max_norm, char** err) {
  try {
    auto g = tensors(grads, n);
    at::NoGradGuard no_grad;
    auto norms = at::_foreach_norm(g, 2);
    auto total = at::linalg_vector_norm(at::stack(norms), 2);
    if (max_norm > 0) {
      auto coef = at::clamp_max(max_norm / (total + 1e-6), 1.0);
      at::_foreach_mul_(g, coef);
    }
    return new at::Tensor(total);
  } catch (const std::exception& e) {
    *err = strdup(e.what());
    return nullptr;
  }
}

// Zeroes the tensors in place with one multi-tensor kernel (`_foreach_zero_`) where zeroing
// them one by one launches a kernel each. Returns 0, or -1 with `err` set.
int lillm_foreach_zero(void** list, size_t n, char** err) {
  try {
    auto t = tensors(list, n);
    at::NoGradGuard no_grad;
    at::_foreach_zero_(t);
    return 0;
  } catch (const std::exception& e) {
    *err = strdup(e.what());
    return -1;
  }
}

}  // extern "C"
