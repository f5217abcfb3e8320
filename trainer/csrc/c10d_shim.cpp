// A C ABI over libtorch's c10d for Rust: a TCPStore rendezvous, a Gloo (CPU) or NCCL (CUDA,
// when built with LILLM_WITH_NCCL) process group, and the two collectives training needs
// (sum all-reduce, broadcast). tch hands tensors over as
// `torch::Tensor*`. Errors come back as malloc'd strings the caller frees.
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef LILLM_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace {
struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> pg;
};

char* error_string(const std::exception& e) { return strdup(e.what()); }

// Rank 0 serves the TCPStore; every group's keys live under `prefix`.
c10::intrusive_ptr<c10d::Store> make_store(const char* store_host, uint16_t store_port, int rank, int world,
                                           const char* prefix, int64_t timeout_ms) {
  c10d::TCPStoreOptions opts;
  opts.port = store_port;
  opts.isServer = rank == 0;
  opts.numWorkers = world;
  opts.waitWorkers = true;
  opts.timeout = std::chrono::milliseconds(timeout_ms);
  auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(store_host), opts);
  return c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
}
}  // namespace

extern "C" {

void* lillm_c10d_gloo_new(const char* store_host, uint16_t store_port, const char* bind_host, int rank,
                          int world, const char* prefix, int64_t timeout_ms, char** err) {
  try {
    auto store = make_store(store_host, store_port, rank, world, prefix, timeout_ms);
    auto pg_opts = c10d::ProcessGroupGloo::Options::create(std::chrono::milliseconds(timeout_ms));
    pg_opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(std::string(bind_host)));
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, pg_opts);
    return new Group{store, pg};
  } catch (const std::exception& e) {
    *err = error_string(e);
    return nullptr;
  }
}

// NCCL for CUDA tensors. `bind_host` is unused: NCCL picks its own interfaces
// (NCCL_SOCKET_IFNAME steers it).
void* lillm_c10d_nccl_new(const char* store_host, uint16_t store_port, const char* bind_host, int rank,
                          int world, const char* prefix, int64_t timeout_ms, char** err) {
#ifdef LILLM_WITH_NCCL
  try {
    auto store = make_store(store_host, store_port, rank, world, prefix, timeout_ms);
    auto pg_opts = c10d::ProcessGroupNCCL::Options::create();
    pg_opts->timeout = std::chrono::milliseconds(timeout_ms);
    auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, pg_opts);
    return new Group{store, pg};
  } catch (const std::exception& e) {
    *err = error_string(e);
    return nullptr;
  }
#else
  (void)store_host; (void)store_port; (void)bind_host; (void)rank; (void)world; (void)prefix; (void)timeout_ms;
  *err = strdup("this build of lillm has no NCCL support (libtorch without CUDA, or NCCL headers missing at build time)");
  return nullptr;
#endif
}

int lillm_c10d_allreduce_sum(void* group, torch::Tensor* tensor, char** err) {
  try {
    std::vector<at::Tensor> tensors{*tensor};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    static_cast<Group*>(group)->pg->allreduce(tensors, opts)->wait();
    return 0;
  } catch (const std::exception& e) {
    *err = error_string(e);
    return -1;
  }
}

int lillm_c10d_broadcast(void* group, torch::Tensor* tensor, int root, char** err) {
  try {
    std::vector<at::Tensor> tensors{*tensor};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    static_cast<Group*>(group)->pg->broadcast(tensors, opts)->wait();
    return 0;
  } catch (const std::exception& e) {
    *err = error_string(e);
    return -1;
  }
}

void lillm_c10d_free(void* group) { delete static_cast<Group*>(group); }

void lillm_c10d_free_error(char* err) { free(err); }

}  // extern "C"
