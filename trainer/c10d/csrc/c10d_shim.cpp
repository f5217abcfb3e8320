// A C ABI over libtorch's c10d for Rust: a TCPStore rendezvous, a Gloo (CPU) or NCCL (CUDA,
// when built with LILLM_WITH_NCCL) process group, and the two collectives training needs
// (sum all-reduce, broadcast), which another thread can abort. tch hands tensors over as
// `torch::Tensor*`. Errors come back as malloc'd strings the caller frees.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <torch/torch.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef LILLM_WITH_NCCL
#include <c10/cuda/CUDACachingAllocator.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace {
struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> pg;
  bool gloo;
  // Set by `lillm_c10d_abort` from any thread: collectives stop waiting.
  std::atomic<bool> aborted{false};
  // A collective was given up while still in flight: its worker may yet touch the group,
  // so the group is never freed.
  std::atomic<bool> abandoned{false};
};

char* error_string(const std::exception& e) { return strdup(e.what()); }

// The store this process serves whenever it is rank 0: started once on a port the OS picks
// and kept for the process's life, so a group given up mid-collective (which keeps its
// reference) never holds the port a later group needs.
std::mutex server_mutex;
c10::intrusive_ptr<c10d::TCPStore> server;

// Rank 0 serves the TCPStore (this process's server when its port is asked for); every
// group's keys live under `prefix`.
c10::intrusive_ptr<c10d::Store> make_store(const char* store_host, uint16_t store_port, int rank, int world,
                                           const char* prefix, int64_t timeout_ms) {
  {
    std::lock_guard<std::mutex> lock(server_mutex);
    if (rank == 0 && server && server->getPort() == store_port) {
      return c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), server);
    }
  }
  c10d::TCPStoreOptions opts;
  opts.port = store_port;
  opts.isServer = rank == 0;
  opts.numWorkers = world;
  opts.waitWorkers = true;
  opts.timeout = std::chrono::milliseconds(timeout_ms);
  auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(store_host), opts);
  return c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
}

// Waits for `work` unless the group is aborted meanwhile (Gloo has no abort of its own: a
// collective blocked on a silent peer would wait out the whole timeout). The poll backs off
// to 1 ms, so a collective finishes at most that much later than it would by blocking.
// NCCL's wait only orders streams; `lillm_c10d_abort` aborts its communicators instead.
int wait_for(Group* g, const c10::intrusive_ptr<c10d::Work>& work, char** err) {
  if (g->gloo) {
    auto pause = std::chrono::microseconds(2);
    while (!work->isCompleted()) {
      if (g->aborted.load()) {
        g->abandoned.store(true);
        *err = strdup("aborted: the group was given up while this collective waited for a peer");
        return -2;
      }
      std::this_thread::sleep_for(pause);
      pause = std::min(pause * 2, std::chrono::microseconds(1000));
    }
  }
  work->wait();
  return 0;
}

// libtorch's flight recorder (a process-wide log of collectives) corrupts its own map when
// process groups of one process enqueue from several threads at once — as a group given up
// mid-collective and its successor, or the ranks of a test, may. It crashed the process
// (SIGSEGV in FlightRecorder::recordWithResetEnabled, about 1 run in 8 of this crate's
// tests); it is off unless the user set TORCH_FR_BUFFER_SIZE. It reads the variable once,
// when the first group records, so this runs before any group exists.
void disable_flight_recorder() {
  static std::once_flag once;
  std::call_once(once, [] { setenv("TORCH_FR_BUFFER_SIZE", "0", /*overwrite=*/0); });
}

int refuse_if_aborted(Group* g, char** err) {
  if (!g->aborted.load()) return 0;
  *err = strdup("aborted: the group was given up");
  return -2;
}
}  // namespace

extern "C" {

// Starts (once per process) the store this process serves when it is rank 0; returns its
// port, or 0 with `err` set.
uint16_t lillm_c10d_serve_store(int64_t timeout_ms, char** err) {
  disable_flight_recorder();
  try {
    std::lock_guard<std::mutex> lock(server_mutex);
    if (!server) {
      c10d::TCPStoreOptions opts;
      opts.port = 0;
      opts.isServer = true;
      opts.waitWorkers = false;
      opts.timeout = std::chrono::milliseconds(timeout_ms);
      server = c10::make_intrusive<c10d::TCPStore>(std::string("127.0.0.1"), opts);
    }
    return server->getPort();
  } catch (const std::exception& e) {
    *err = error_string(e);
    return 0;
  }
}

void* lillm_c10d_gloo_new(const char* store_host, uint16_t store_port, const char* bind_host, int rank,
                          int world, const char* prefix, int64_t timeout_ms, char** err) {
  disable_flight_recorder();
  try {
    auto store = make_store(store_host, store_port, rank, world, prefix, timeout_ms);
    auto pg_opts = c10d::ProcessGroupGloo::Options::create(std::chrono::milliseconds(timeout_ms));
    pg_opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(std::string(bind_host)));
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, pg_opts);
    return new Group{store, pg, true};
  } catch (const std::exception& e) {
    *err = error_string(e);
    return nullptr;
  }
}

// NCCL for CUDA tensors. `bind_host` is unused: NCCL picks its own interfaces
// (NCCL_SOCKET_IFNAME steers it).
void* lillm_c10d_nccl_new(const char* store_host, uint16_t store_port, const char* bind_host, int rank,
                          int world, const char* prefix, int64_t timeout_ms, char** err) {
  disable_flight_recorder();
#ifdef LILLM_WITH_NCCL
  try {
    auto store = make_store(store_host, store_port, rank, world, prefix, timeout_ms);
    auto pg_opts = c10d::ProcessGroupNCCL::Options::create();
    pg_opts->timeout = std::chrono::milliseconds(timeout_ms);
    auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, pg_opts);
    return new Group{store, pg, false};
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
    auto g = static_cast<Group*>(group);
    if (refuse_if_aborted(g, err)) return -2;
    std::vector<at::Tensor> tensors{*tensor};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    return wait_for(g, g->pg->allreduce(tensors, opts), err);
  } catch (const std::exception& e) {
    *err = error_string(e);
    return -1;
  }
}

int lillm_c10d_broadcast(void* group, torch::Tensor* tensor, int root, char** err) {
  try {
    auto g = static_cast<Group*>(group);
    if (refuse_if_aborted(g, err)) return -2;
    std::vector<at::Tensor> tensors{*tensor};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    return wait_for(g, g->pg->broadcast(tensors, opts), err);
  } catch (const std::exception& e) {
    *err = error_string(e);
    return -1;
  }
}

// Makes the group's collectives, in flight or to come, fail at once. Safe from any thread
// while the group lives.
void lillm_c10d_abort(void* group) {
  auto g = static_cast<Group*>(group);
  if (g->aborted.exchange(true)) return;
  if (!g->gloo) {
    try {
      g->pg->abort();
    } catch (const std::exception&) {
      // Aborting a broken communicator may itself fail; the group is given up either way.
    }
  }
}

// Frees the group, unless a collective was given up in flight: then its worker thread may
// still write to the group's buffers, so the group is left allocated (a small leak per
// aborted group, paid only when a peer went silent).
void lillm_c10d_free(void* group) {
  auto g = static_cast<Group*>(group);
  if (!g->abandoned.load()) delete g;
}

void lillm_c10d_free_error(char* err) { free(err); }

// The most bytes the CUDA caching allocator has had allocated on `device` since the last
// reset (libtorch's `max_memory_allocated`); with `reset`, starts a new window. -1 where
// this build has no CUDA or the device's allocator cannot say.
int64_t lillm_cuda_peak_allocated(int device, bool reset) {
#ifdef LILLM_WITH_NCCL
  try {
    auto index = static_cast<c10::DeviceIndex>(device);
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(index);
    auto aggregate = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    int64_t peak = stats.allocated_bytes[aggregate].peak;
    if (reset) c10::cuda::CUDACachingAllocator::resetPeakStats(index);
    return peak;
  } catch (const std::exception&) {
    return -1;
  }
#else
  (void)device; (void)reset;
  return -1;
#endif
}

}  // extern "C"
