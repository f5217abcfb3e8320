// A C ABI over libtorch's c10d for Rust: a TCPStore rendezvous, a Gloo process group, and the
// two collectives training needs (sum all-reduce, broadcast). tch hands tensors over as
// `torch::Tensor*`. Errors come back as malloc'd strings the caller frees.
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

namespace {
struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
};

char* error_string(const std::exception& e) { return strdup(e.what()); }
}  // namespace

extern "C" {

void* lillm_c10d_gloo_new(const char* store_host, uint16_t store_port, const char* bind_host, int rank,
                          int world, const char* prefix, int64_t timeout_ms, char** err) {
  try {
    c10d::TCPStoreOptions opts;
    opts.port = store_port;
    opts.isServer = rank == 0;
    opts.numWorkers = world;
    opts.waitWorkers = true;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(store_host), opts);
    c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    auto pg_opts = c10d::ProcessGroupGloo::Options::create(std::chrono::milliseconds(timeout_ms));
    pg_opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(std::string(bind_host)));
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, pg_opts);
    return new Group{store, pg};
  } catch (const std::exception& e) {
    *err = error_string(e);
    return nullptr;
  }
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
