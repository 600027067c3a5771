// Phase timings of the GPU model for profiling (MOERL_GPU_PROFILE=1 in the environment): kernels/cuda/phase_timer.hpp's
// PhaseTimer with names "<precision>.<what>" (e.g. "fp8.attn.fwd"), built only when profiling.
#pragma once
#include <cuda_runtime_api.h>

#include <string>

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

// Consecutive sub-phases "<precision>.<prefix>.<what>" of one call (kernels/cuda/phase_timer.hpp).
inline cuda_detail::PhaseSequence sub_phases(Precision p, const char* prefix, cudaStream_t stream) {
  return cuda_detail::PhaseSequence(profiling() ? std::string(precision_name(p)) + "." + prefix : std::string(), stream);
}

}  // namespace moerl::gpu::detail
