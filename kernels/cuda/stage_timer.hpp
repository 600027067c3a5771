// Device time of the stages inside one CUDA op (e.g. the routed experts' quantizations and GEMMs), for profiling
// only: with MOERL_GPU_PROFILE=1 in the environment a StageTimer records a CUDA event pair around its scope on
// `stream`; at exit every pair is resolved and one line per stage name goes to stderr (calls, device ms total and
// per call). Off otherwise, at the cost of one branch per stage. runtime/gpu/gpu_profile.hpp's PhaseTimer does the
// same for the model's phases; this one lives with the kernels, which do not link the GPU runtime.
// Diagnostics only: CUDA errors here are ignored, a destructor never throws.
#pragma once
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace moerl::cuda_detail {

inline bool stage_profiling() {
  static const bool on = [] {
    const char* v = std::getenv("MOERL_GPU_PROFILE");
    return v != nullptr && *v != '\0' && *v != '0';
  }();
  return on;
}

struct StageSample {
  std::string name;
  cudaEvent_t start, stop;
};

struct StageRegistry {
  std::mutex mutex;
  std::vector<StageSample> samples;
};

inline StageRegistry& stage_registry() {
  static StageRegistry* r = new StageRegistry;  // never destroyed: the exit handler reads it
  return *r;
}

inline void stage_report() {
  StageRegistry& reg = stage_registry();
  const std::lock_guard lock(reg.mutex);
  std::map<std::string, std::pair<long, double>> totals;
  for (const StageSample& s : reg.samples) {
    float ms = 0;
    if (cudaEventSynchronize(s.stop) != cudaSuccess || cudaEventElapsedTime(&ms, s.start, s.stop) != cudaSuccess) {
      cudaGetLastError();
      continue;
    }
    auto& t = totals[s.name];
    ++t.first;
    t.second += ms;
  }
  std::fprintf(stderr, "gpu stages (MOERL_GPU_PROFILE): stage, calls, device ms total, device ms/call\n");
  for (const auto& [name, t] : totals)
    std::fprintf(stderr, "  %-44s %6ld %10.2f %9.3f\n", name.c_str(), t.first, t.second,
                 t.second / static_cast<double>(t.first));
}

class StageTimer {
 public:
  StageTimer(std::string name, cudaStream_t stream) {
    if (!stage_profiling()) return;
    static const bool registered = [] { return std::atexit(stage_report) == 0; }();
    (void)registered;
    if (cudaEventCreate(&start_) != cudaSuccess || cudaEventRecord(start_, stream) != cudaSuccess) {
      cudaGetLastError();
      start_ = nullptr;
      return;
    }
    name_ = std::move(name);
    stream_ = stream;
  }
  ~StageTimer() {
    if (start_ == nullptr) return;
    cudaEvent_t stop = nullptr;
    if (cudaEventCreate(&stop) != cudaSuccess || cudaEventRecord(stop, stream_) != cudaSuccess) {
      cudaGetLastError();
      return;
    }
    StageRegistry& reg = stage_registry();
    const std::lock_guard lock(reg.mutex);
    reg.samples.push_back({std::move(name_), start_, stop});
  }
  StageTimer(const StageTimer&) = delete;
  StageTimer& operator=(const StageTimer&) = delete;

 private:
  std::string name_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t start_ = nullptr;
};

}  // namespace moerl::cuda_detail
