// SwiGLU's FP32 arithmetic on the GPU, shared by kernels/cuda/swiglu.cu and the fused FP8 kernels of
// kernels/cuda/swiglu_fp8.cu (so both give the same bits): the CPU's expressions with explicit rounding; _rn
// intrinsics are never contracted into an FMA.
#pragma once
#include <cuda_runtime.h>

namespace moerl::cuda::swiglu_detail {

__device__ __forceinline__ float silu_times(float g, float u) {
  return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);  // g / (1 + exp(-g)) * u
}

// dg and du from s = RN(1 / (1 + exp(-g))), shared by silu_grads and silu_grads4.
__device__ __forceinline__ void silu_grads_from(float dh, float g, float u, float s, float& dg, float& du) {
  du = __fmul_rn(__fmul_rn(dh, g), s);
  const float slope = __fadd_rn(1.0f, __fmul_rn(g, __fsub_rn(1.0f, s)));  // 1 + g·(1 − s)
  dg = __fmul_rn(__fmul_rn(__fmul_rn(dh, u), s), slope);
}

__device__ __forceinline__ void silu_grads(float dh, float g, float u, float& dg, float& du) {
  const float s = __frcp_rn(__fadd_rn(1.0f, expf(-g)));  // RN(1 / x) as the division gives, without its cost
  silu_grads_from(dh, g, u, s, dg, du);
}

// RN(1 / x) for x in [1, 2^126): __frcp_rn's own fast path (MUFU.RCP, then one Newton step, the instructions ptxas
// emits for it) without its range check and branch (6 instructions an element in the SwiGLU backward: ncu's source
// counters on the H200, bench/results/2026-11-30-gpu-ncu-swiglu-h200-db3c9d8.txt). The library flushes the step's
// residual x r - 1 to zero when subnormal; here it never is (x r lies within 2^-22 of 1 and is a multiple of
// 2^-47 or more). tests/gpu/swiglu_math_gpu.cu checks it against __frcp_rn for every float in that range.
__device__ __forceinline__ float rcp_rn_in_range(float x) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return __fmaf_rn(r, -__fmaf_rn(x, r, -1.0f), r);
}

// silu_grads of 4 elements: their sigmoids' reciprocals on rcp_rn_in_range when all 4 denominators 1 + exp(-g)
// lie below 2^126 (g above about -87.3; one unsigned compare of their bit patterns, which also sends NaN and Inf to
// __frcp_rn), else on __frcp_rn: the same bits as silu_grads either way.
__device__ __forceinline__ void silu_grads4(const float (&dh)[4], const float (&g)[4], const float (&u)[4],
                                            float (&dg)[4], float (&du)[4]) {
  float x[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) x[k] = __fadd_rn(1.0f, expf(-g[k]));
  const unsigned top = max(max(__float_as_uint(x[0]), __float_as_uint(x[1])),
                           max(__float_as_uint(x[2]), __float_as_uint(x[3])));
  float s[4];
  if (top < 0x7E800000u) {  // 2^126
#pragma unroll
    for (int k = 0; k < 4; ++k) s[k] = rcp_rn_in_range(x[k]);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) s[k] = __frcp_rn(x[k]);
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) silu_grads_from(dh[k], g[k], u[k], s[k], dg[k], du[k]);
}

}  // namespace moerl::cuda::swiglu_detail
