// Phase timings of the GPU model for profiling (MOERL_GPU_PROFILE=1 in the environment): kernels/cuda/phase_timer.hpp's
// PhaseTimer with names "<precision>.<what>" (e.g. "fp8.attn.fwd"), built only when profiling.
#pragma once
#include <cuda_runtime_api.h>

#include <optional>
#include <string>
#include <utility>

#include "kernels/cuda/phase_timer.hpp"
#include "kernels/linear.hpp"

namespace moerl::gpu::detail {

using cuda_detail::profiling;

class PhaseTimer : public cuda_detail::PhaseTimer {
 public:
  using cuda_detail::PhaseTimer::PhaseTimer;
  PhaseTimer(Precision p, const char* what, cudaStream_t stream)
      : cuda_detail::PhaseTimer(profiling() ? std::string(precision_name(p)) + "." + what : std::string(), stream) {}
};

// Consecutive sub-phases of one call: next("x") ends the current one and starts "<precision>.<prefix>.x"; the
// last ends with the object. Nothing is built unless profiling.
class SubPhases {
 public:
  SubPhases(Precision p, std::string prefix, cudaStream_t stream) : p_(p), prefix_(std::move(prefix)), stream_(stream) {}
  void next(const char* what) {
    if (!profiling()) return;
    timer_.reset();
    timer_.emplace(p_, (prefix_ + "." + what).c_str(), stream_);
  }

 private:
  Precision p_;
  std::string prefix_;
  cudaStream_t stream_;
  std::optional<PhaseTimer> timer_;
};

}  // namespace moerl::gpu::detail
