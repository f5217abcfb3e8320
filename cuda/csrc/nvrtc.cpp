// NVRTC, loaded from the torch wheel's CUDA libraries, compiling CUDA C++ to PTX for an
// architecture named by the caller. It needs neither a GPU nor a driver: this is how a
// machine without a GPU checks that the kernels libtorch's jiterator compiles at run time on
// the GPU (kernels.cpp) do compile, with the options jiterator gives NVRTC.
#include <dlfcn.h>

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "shim_error.h"

namespace {
using lillm_shim::fail;

// NVRTC's C API, with nvrtcResult as int and nvrtcProgram as an opaque pointer.
using Program = void*;
using CreateProgram = int (*)(Program*, const char*, const char*, int, const char* const*,
                              const char* const*);
using CompileProgram = int (*)(Program, int, const char* const*);
using GetSize = int (*)(Program, size_t*);
using GetText = int (*)(Program, char*);
using DestroyProgram = int (*)(Program*);

void* open_library(const char* path, int flags) {
  void* lib = dlopen(path, RTLD_NOW | flags);
  if (lib == nullptr) {
    throw std::runtime_error(std::string("cannot load ") + path + ": " + dlerror());
  }
  return lib;
}

template <typename F>
F symbol(void* lib, const char* name) {
  auto f = reinterpret_cast<F>(dlsym(lib, name));
  if (f == nullptr) {
    throw std::runtime_error(std::string("libnvrtc has no ") + name);
  }
  return f;
}

std::string text(Program program, GetSize size, GetText read) {
  size_t n = 0;
  if (size(program, &n) != 0) {
    return "";
  }
  std::string out(n, '\0');
  read(program, out.data());
  return out.c_str();
}
}  // namespace

extern "C" {

// Compiles `source` to PTX for `arch` (say "compute_90") with the NVRTC library at `nvrtc`,
// after loading its builtins library `builtins` (NVRTC opens that by name, which finds it
// outside the library path only if it is already loaded). Returns the PTX, or null with
// `err` set to the compiler's log or to why NVRTC could not be loaded; free either with
// lillm_cuda_free_error.
char* lillm_cuda_nvrtc_ptx(const char* nvrtc, const char* builtins, const char* source,
                           const char* arch, char** err) {
  try {
    open_library(builtins, RTLD_GLOBAL);
    void* lib = open_library(nvrtc, RTLD_LOCAL);
    auto create = symbol<CreateProgram>(lib, "nvrtcCreateProgram");
    auto compile = symbol<CompileProgram>(lib, "nvrtcCompileProgram");
    auto log_size = symbol<GetSize>(lib, "nvrtcGetProgramLogSize");
    auto log = symbol<GetText>(lib, "nvrtcGetProgramLog");
    auto ptx_size = symbol<GetSize>(lib, "nvrtcGetPTXSize");
    auto ptx = symbol<GetText>(lib, "nvrtcGetPTX");
    auto destroy = symbol<DestroyProgram>(lib, "nvrtcDestroyProgram");
    Program program = nullptr;
    if (create(&program, source, "lillm_kernels.cu", 0, nullptr, nullptr) != 0) {
      throw std::runtime_error("nvrtcCreateProgram failed");
    }
    // jiterator's options, with the architecture given instead of the device's.
    std::string gpu = std::string("--gpu-architecture=") + arch;
    std::vector<const char*> options = {"--std=c++17", gpu.c_str(), "-default-device"};
    int rc = compile(program, static_cast<int>(options.size()), options.data());
    std::string out = rc == 0 ? text(program, ptx_size, ptx) : text(program, log_size, log);
    destroy(&program);
    if (rc != 0) {
      fail(err, ("compiling for " + std::string(arch) + ": " + out).c_str());
      return nullptr;
    }
    return strdup(out.c_str());
  } catch (const std::exception& e) {
    fail(err, e.what());
    return nullptr;
  }
}

}  // extern "C"
