// libtorch's Kineto profiler behind a C ABI: what a span of work spent in each operator (on
// the CPU) and each kernel (on CUDA), as PyTorch's `torch.profiler` records it, plus a
// Chrome trace of it. Errors come back through `err` (free with lillm_cuda_free_error).
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <utility>

#include <torch/csrc/autograd/profiler_kineto.h>

namespace {
char* copy(const std::string& s) { return strdup(s.c_str()); }

// JSON string escaping for operator and kernel names (quotes, backslashes, controls).
std::string quoted(const std::string& s) {
  std::ostringstream out;
  out << '"';
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out << '\\' << c;
    } else if (c < 0x20) {
      out << ' ';
    } else {
      out << c;
    }
  }
  out << '"';
  return out.str();
}
}  // namespace

extern "C" {

// Starts recording this thread's operators, and CUDA kernels with `cuda`. Returns 0, or -1
// with `err` set.
int lillm_profiler_start(bool cuda, char** err) {
  try {
    using torch::profiler::impl::ActivityType;
    std::set<ActivityType> activities{ActivityType::CPU};
    if (cuda) {
      activities.insert(ActivityType::CUDA);
    } else {
      // Recording only the CPU, Kineto's complaints that it finds no GPU are noise (unless
      // the user chose a log level).
      setenv("KINETO_LOG_LEVEL", "5", 0);
    }
    torch::profiler::impl::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO);
    torch::autograd::profiler::prepareProfiler(config, activities);
    torch::autograd::profiler::enableProfiler(config, activities);
    return 0;
  } catch (const std::exception& e) {
    *err = copy(e.what());
    return -1;
  }
}

// Stops recording, writes the Chrome trace to `trace` (unless null) and returns what each
// operator and kernel took as a JSON array of [name, device, calls, total ns], or null with
// `err` set. Free the string with lillm_cuda_free_error.
char* lillm_profiler_stop(const char* trace, char** err) {
  try {
    auto result = torch::autograd::profiler::disableProfiler();
    if (trace != nullptr) result->save(trace);
    std::map<std::pair<std::string, std::string>, std::pair<uint64_t, uint64_t>> totals;
    for (const auto& event : result->events()) {
      std::string device = event.deviceType() == c10::DeviceType::CUDA ? "cuda" : "cpu";
      auto& [calls, ns] = totals[{event.name(), device}];
      calls += 1;
      ns += event.durationNs();
    }
    std::ostringstream out;
    out << '[';
    bool first = true;
    for (const auto& [key, value] : totals) {
      out << (first ? "" : ",") << '[' << quoted(key.first) << ',' << quoted(key.second) << ','
          << value.first << ',' << value.second << ']';
      first = false;
    }
    out << ']';
    return copy(out.str());
  } catch (const std::exception& e) {
    *err = copy(e.what());
    return nullptr;
  }
}

}  // extern "C"
