// Phase timings of the GPU model for profiling (MOERL_GPU_PROFILE=1 in the environment; off otherwise, at the cost
// of one branch per phase). A PhaseTimer records a CUDA event pair around its scope on the run's stream and the
// host time the scope took to enqueue its work; nothing waits while running. At exit the pairs are resolved and
// one line per phase name goes to stderr: calls, device ms (total, mean and median per call) and host ms. A phase whose
// host time is close to its device time is bound by the host's launches, not by the GPU.
#pragma once
#include <cuda_runtime_api.h>

#include <chrono>
#include <string>

#include "kernels/linear.hpp"

namespace moerl::gpu::detail {

bool profiling();

class PhaseTimer {
 public:
  // name: the phase, e.g. "fp8.attn.fwd". Does nothing unless profiling().
  PhaseTimer(std::string name, cudaStream_t stream);
  // The name "<precision>.<what>", built only when profiling.
  PhaseTimer(Precision p, const char* what, cudaStream_t stream);
  ~PhaseTimer();
  PhaseTimer(const PhaseTimer&) = delete;
  PhaseTimer& operator=(const PhaseTimer&) = delete;

 private:
  std::string name_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t start_ = nullptr;
  std::chrono::steady_clock::time_point host_start_;
};

}  // namespace moerl::gpu::detail
