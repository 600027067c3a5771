// MOERL_GPU_PROFILE phase timings (kernels/cuda/phase_timer.hpp). Diagnostics only: CUDA errors here are ignored
// (the model's own checks report real failures), and a destructor never throws.
#include "kernels/cuda/phase_timer.hpp"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <numeric>
#include <utility>
#include <vector>

namespace moerl::cuda_detail {
namespace {

struct Sample {
  std::string name;
  cudaEvent_t start, stop;
  double host_ms;
};

struct Registry {
  std::mutex mutex;
  std::vector<Sample> samples;
};

Registry& registry() {
  static Registry* r = new Registry;  // never destroyed: the exit handler reads it
  return *r;
}

// Resolves every pair (the device is idle by now or soon) and prints the table, the largest device total first.
// The median per call sits beside the mean because a phase's first call can carry one-time costs: cuBLASLt's first
// heuristic query takes ~160 ms on the H200, which once made fp8's router GEMM look 1.5 ms per call (its median:
// 0.05 ms, as in bf16). Likewise the host's time: a phase whose host median exceeds its device median waits on the
// host (its launches, or a synchronization inside it).
void report() {
  Registry& reg = registry();
  const std::lock_guard lock(reg.mutex);
  struct Total {
    std::vector<double> device_ms, host_ms;
  };
  std::map<std::string, Total> totals;
  for (const Sample& s : reg.samples) {
    float ms = 0;
    if (cudaEventSynchronize(s.stop) != cudaSuccess || cudaEventElapsedTime(&ms, s.start, s.stop) != cudaSuccess) {
      cudaGetLastError();
      continue;
    }
    Total& t = totals[s.name];
    t.device_ms.push_back(ms);
    t.host_ms.push_back(s.host_ms);
  }
  struct Row {
    std::string name;
    size_t calls;
    double total, median, host, host_median;
  };
  auto sum = [](const std::vector<double>& v) { return std::accumulate(v.begin(), v.end(), 0.0); };
  auto median = [](std::vector<double>& v) {
    std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(v.size() / 2), v.end());
    return v[v.size() / 2];
  };
  std::vector<Row> rows;
  for (auto& [name, t] : totals)
    rows.push_back({name, t.device_ms.size(), sum(t.device_ms), median(t.device_ms), sum(t.host_ms),
                    median(t.host_ms)});
  std::sort(rows.begin(), rows.end(), [](const Row& a, const Row& b) { return a.total > b.total; });
  std::fprintf(stderr, "gpu profile (MOERL_GPU_PROFILE): phase, calls, device ms total, device ms/call (mean, "
                       "median), host ms/call (mean, median)\n");
  for (const Row& r : rows) {
    const auto n = static_cast<double>(r.calls);
    std::fprintf(stderr, "  %-36s %6zu %10.2f %9.3f %9.3f %9.3f %9.3f\n", r.name.c_str(), r.calls, r.total,
                 r.total / n, r.median, r.host / n, r.host_median);
  }
}

}  // namespace

bool profiling() {
  static const bool on = [] {
    const char* v = std::getenv("MOERL_GPU_PROFILE");
    return v != nullptr && *v != '\0' && *v != '0';
  }();
  return on;
}

PhaseTimer::PhaseTimer(std::string name, cudaStream_t stream) {
  if (!profiling()) return;
  static const bool registered = [] { return std::atexit(report) == 0; }();
  (void)registered;
  if (cudaEventCreate(&start_) != cudaSuccess || cudaEventRecord(start_, stream) != cudaSuccess) {
    cudaGetLastError();
    start_ = nullptr;
    return;
  }
  name_ = std::move(name);
  stream_ = stream;
  host_start_ = std::chrono::steady_clock::now();
}

PhaseTimer::~PhaseTimer() {
  if (start_ == nullptr) return;
  cudaEvent_t stop = nullptr;
  if (cudaEventCreate(&stop) != cudaSuccess || cudaEventRecord(stop, stream_) != cudaSuccess) {
    cudaGetLastError();
    return;
  }
  const double host_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - host_start_).count();
  Registry& reg = registry();
  const std::lock_guard lock(reg.mutex);
  reg.samples.push_back({std::move(name_), start_, stop, host_ms});
}

}  // namespace moerl::cuda_detail
