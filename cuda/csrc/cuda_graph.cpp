// libtorch's CUDA graphs behind a C ABI: capture the kernels that libtorch launches for a
// piece of work once, then replay them with one launch. Capture cannot run on the default
// stream, so the work runs on a side stream between lillm_cuda_side_stream_enter and
// _leave (the warm-up runs too, so that lazily created cuBLAS workspaces belong to that
// stream). Every function catches libtorch's exceptions and reports them through `err`
// (free it with lillm_cuda_free_error). Without CUDA in the torch build each one fails.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#ifdef LILLM_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "shim_error.h"

namespace {
using lillm_shim::fail;
using lillm_shim::guarded;

#ifdef LILLM_WITH_CUDA
// The stream that was current before entering the side stream, restored on leaving.
struct SideStream {
  c10::cuda::CUDAStream previous;
};
#endif
}  // namespace

extern "C" {

// Makes a fresh stream of `device` current for this thread, after everything queued so far
// has run. Returns a handle for lillm_cuda_side_stream_leave, or null with `err` set.
void* lillm_cuda_side_stream_enter(int device, char** err) {
#ifdef LILLM_WITH_CUDA
  try {
    auto index = static_cast<c10::DeviceIndex>(device);
    c10::cuda::set_device(index);
    auto previous = c10::cuda::getCurrentCUDAStream(index);
    c10::cuda::device_synchronize();
    c10::cuda::setCurrentCUDAStream(c10::cuda::getStreamFromPool(false, index));
    return new SideStream{previous};
  } catch (const std::exception& e) {
    fail(err, e.what());
    return nullptr;
  }
#else
  (void)device;
  fail(err, "this torch build has no CUDA");
  return nullptr;
#endif
}

// Waits for the side stream's work, makes the previous stream current again and frees the
// handle.
int lillm_cuda_side_stream_leave(void* handle, char** err) {
#ifdef LILLM_WITH_CUDA
  auto side = static_cast<SideStream*>(handle);
  int rc = guarded(err, [&] {
    c10::cuda::device_synchronize();
    c10::cuda::setCurrentCUDAStream(side->previous);
  });
  delete side;
  return rc;
#else
  (void)handle;
  return fail(err, "this torch build has no CUDA");
#endif
}

// Starts capturing the current stream's work into a new graph whose memory comes from the
// pool (pool_hi, pool_lo), or a pool of its own when both are 0. Returns the graph, or null
// with `err` set.
void* lillm_cuda_graph_capture_begin(uint64_t pool_hi, uint64_t pool_lo, char** err) {
#ifdef LILLM_WITH_CUDA
  auto graph = new at::cuda::CUDAGraph();
  try {
    graph->capture_begin({pool_hi, pool_lo});
    return graph;
  } catch (const std::exception& e) {
    delete graph;
    fail(err, e.what());
    return nullptr;
  }
#else
  (void)pool_hi; (void)pool_lo;
  fail(err, "this torch build has no CUDA");
  return nullptr;
#endif
}

// Ends the capture begun on `graph` and makes it replayable.
int lillm_cuda_graph_capture_end(void* graph, char** err) {
#ifdef LILLM_WITH_CUDA
  return guarded(err, [&] { static_cast<at::cuda::CUDAGraph*>(graph)->capture_end(); });
#else
  (void)graph;
  return fail(err, "this torch build has no CUDA");
#endif
}

// Launches the captured work on the current stream.
int lillm_cuda_graph_replay(void* graph, char** err) {
#ifdef LILLM_WITH_CUDA
  return guarded(err, [&] { static_cast<at::cuda::CUDAGraph*>(graph)->replay(); });
#else
  (void)graph;
  return fail(err, "this torch build has no CUDA");
#endif
}

// The memory pool of a captured graph, for the next capture to share (graphs that never run
// at the same time can reuse each other's intermediate buffers).
void lillm_cuda_graph_pool(void* graph, uint64_t* pool_hi, uint64_t* pool_lo) {
#ifdef LILLM_WITH_CUDA
  auto pool = static_cast<at::cuda::CUDAGraph*>(graph)->pool();
  *pool_hi = pool.first;
  *pool_lo = pool.second;
#else
  (void)graph;
  *pool_hi = 0;
  *pool_lo = 0;
#endif
}

void lillm_cuda_graph_free(void* graph) {
#ifdef LILLM_WITH_CUDA
  delete static_cast<at::cuda::CUDAGraph*>(graph);
#else
  (void)graph;
#endif
}

void lillm_cuda_free_error(char* err) { free(err); }

// Bytes the CUDA caching allocator holds from the driver on `device` now (libtorch's
// `memory_reserved`), graph pools included; -1 without CUDA.
int64_t lillm_cuda_reserved(int device) {
#ifdef LILLM_WITH_CUDA
  try {
    auto stats =
        c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    auto aggregate = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    return stats.reserved_bytes[aggregate].current;
  } catch (const std::exception&) {
    return -1;
  }
#else
  (void)device;
  return -1;
#endif
}

}  // extern "C"
