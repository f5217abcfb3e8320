// How every function of the lillm-cuda shim reports libtorch's exceptions: the message in a
// strdup'ed `err` (freed by lillm_cuda_free_error) and -1 or null as the result.
#pragma once
#include <cstring>
#include <exception>

namespace lillm_shim {
inline int fail(char** err, const char* what) {
  *err = strdup(what);
  return -1;
}

// Runs `f`, turning libtorch's exception into -1 and `err`.
template <typename F>
int guarded(char** err, F f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    return fail(err, e.what());
  }
}
}  // namespace lillm_shim
