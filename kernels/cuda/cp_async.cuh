// Asynchronous copies from global to shared memory (cp.async, sm_80+), shared by the kernels that stage their loads
// in shared memory: the tensor-core attention, the grouped FP8 GEMM, the pipelined quantization and the optimizer's
// FP8 update. A thread's copies complete in the commit groups it closes; cp_async_wait<N> waits for all but its N
// most recent groups.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace moerl::cuda {

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes, cached in L2 only.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_address(smem)), "l"(gmem) : "memory");
}

// 16 bytes of which the first src_bytes (0 .. 16) are read, the rest zero-filled.
__device__ __forceinline__ void cp_async16_zfill(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(smem)), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}

// 8 bytes (through L1: the L2-only form takes 16).
__device__ __forceinline__ void cp_async8(void* smem, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(shared_address(smem)), "l"(gmem) : "memory");
}

// 4 bytes of which the first src_bytes (0 or 4) are read, the rest zero-filled.
__device__ __forceinline__ void cp_async4_zfill(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(shared_address(smem)), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

}  // namespace moerl::cuda
