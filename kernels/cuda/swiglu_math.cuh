// SwiGLU's FP32 arithmetic on the GPU, shared by kernels/cuda/swiglu.cu and the fused FP8 kernels of
// kernels/cuda/swiglu_fp8.cu (so both give the same bits): the CPU's expressions with explicit rounding; _rn
// intrinsics are never contracted into an FMA.
#pragma once
#include <cuda_runtime.h>

namespace moerl::cuda::swiglu_detail {

__device__ __forceinline__ float silu_times(float g, float u) {
  return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);  // g / (1 + exp(-g)) * u
}

__device__ __forceinline__ void silu_grads(float dh, float g, float u, float& dg, float& du) {
  const float s = __frcp_rn(__fadd_rn(1.0f, expf(-g)));  // RN(1 / x) as the division gives, without its cost
  du = __fmul_rn(__fmul_rn(dh, g), s);
  const float slope = __fadd_rn(1.0f, __fmul_rn(g, __fsub_rn(1.0f, s)));  // 1 + g·(1 − s)
  dg = __fmul_rn(__fmul_rn(__fmul_rn(dh, u), s), slope);
}

}  // namespace moerl::cuda::swiglu_detail
