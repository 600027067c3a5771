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
#include <string>

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

}  // namespace moerl::cuda_detail
