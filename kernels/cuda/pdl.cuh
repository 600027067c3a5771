// Programmatic dependent launch (PDL, sm_90). A kernel launched by launch_after_previous may be placed on the GPU
// while the kernel before it on the stream is still running (its last blocks draining), which hides most of the
// 2-3 us that separate dependent kernels otherwise (bench-600m's fp8 step has ~480 such boundaries a step).
//
// Contract: such a kernel calls await_previous_grid() before its first global-memory access. The wait returns once
// the previous kernel has finished and its writes are visible, so every read and write keeps stream order; what runs
// earlier is only the launch and the block's start. A kernel that calls it but is launched the plain way, or after
// work that is not a kernel (a copy, a memset, an event wait), waits for nothing.
//
// MOERL_PDL=off (read once per process) launches them the plain way, to tell a suspected ordering bug from a real one
// or to measure what PDL gains.
#pragma once
#include <cuda_runtime.h>

#include <utility>

#include "kernels/cuda/cuda_check.hpp"
#include "runtime/util/env_switch.hpp"

namespace moerl::cuda {

inline bool pdl_enabled() {
  static const bool on = !env_switch("MOERL_PDL", "on", "off");
  return on;
}

// First statement of a kernel launched by launch_after_previous (see above). It then lets the next kernel on the
// stream be launched early too: that kernel waits in turn, so this one's writes are safe.
__device__ __forceinline__ void await_previous_grid() {
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// kernel<<<grid, block, smem, stream>>>(args...) as a programmatic dependent launch; checked as CUDA_CHECK_LAUNCH.
template <class... Params, class... Args>
void launch_after_previous(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                           Args&&... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = pdl_enabled() ? 1 : 0;
  CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace moerl::cuda
