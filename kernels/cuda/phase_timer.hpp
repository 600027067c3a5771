// Device and host time of named phases, for profiling only (MOERL_GPU_PROFILE=1 in the environment; off
// otherwise, at the cost of one branch per phase): the model's phases (runtime/gpu/gpu_profile.hpp adds the
// precision to their names) and the stages inside one CUDA op (e.g. the routed experts' quantizations and GEMMs).
// A PhaseTimer records a CUDA event pair around its scope on its stream and the host time the scope took to
// enqueue its work; nothing waits while running. At exit the pairs are resolved and one line per name goes to
// stderr: calls, device ms (total, mean and median per call) and host ms per call. A phase whose host time is
// close to its device time is bound by the host's launches, not by the GPU.
// Diagnostics only: CUDA errors here are ignored, a destructor never throws.
#pragma once
#include <cuda_runtime_api.h>

#include <chrono>
#include <optional>
#include <string>
#include <utility>

namespace moerl::cuda_detail {

bool profiling();

class PhaseTimer {
 public:
  // name: e.g. "fp8.attn.fwd". Does nothing unless profiling().
  PhaseTimer(std::string name, cudaStream_t stream);
  ~PhaseTimer();
  PhaseTimer(const PhaseTimer&) = delete;
  PhaseTimer& operator=(const PhaseTimer&) = delete;

 private:
  std::string name_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t start_ = nullptr;
  std::chrono::steady_clock::time_point host_start_;
};

// Consecutive phases of one call: next("x") ends the current phase and starts "<prefix>.x"; the last ends with
// the object. An empty prefix (what callers pass unless profiling(), so that no name is built) times nothing.
class PhaseSequence {
 public:
  PhaseSequence(std::string prefix, cudaStream_t stream) : prefix_(std::move(prefix)), stream_(stream) {}
  void next(const char* what) {
    if (prefix_.empty()) return;
    timer_.reset();
    timer_.emplace(prefix_ + "." + what, stream_);
  }

 private:
  std::string prefix_;
  cudaStream_t stream_;
  std::optional<PhaseTimer> timer_;
};

}  // namespace moerl::cuda_detail
