// Kernel attributes that must be set per device. cudaFuncSetAttribute acts on the current device's context only,
// so a process that runs a kernel on several GPUs (one data-parallel replica per GPU,
// runtime/gpu/gpu_data_parallel.hpp) must set it on each of them.
#pragma once
#include <cuda_runtime_api.h>

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "kernels/cuda/cuda_check.hpp"

namespace moerl::cuda_detail {

// Raises kernel K's dynamic shared memory limit to `bytes` on the current device: once per (kernel, device),
// remembered in one bit per device (devices 0..63; a device beyond sets it at every call).
template <auto K> void allow_dynamic_smem(size_t bytes) {
  static std::atomic<uint64_t> done{0};
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  const uint64_t bit = device >= 0 && device < 64 ? uint64_t{1} << device : 0;
  if (bit != 0 && (done.load(std::memory_order_acquire) & bit) != 0) return;
  CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(K), cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(bytes)));
  done.fetch_or(bit, std::memory_order_release);
}

}  // namespace moerl::cuda_detail
