// The per-element AdamW update shared by the optimizer's kernels (kernels/cuda/adamw.cu: spans of parameters;
// adamw_fp8.cu: weights whose FP8 copies the update rewrites), so that both give moerl::AdamW's bits
// (kernels/cuda/adamw.hpp says how).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/ops_common.cuh"

namespace moerl::cuda::adamw_detail {

using ops_detail::bf16_from_float;
using ops_detail::float_from_bf16;

// The per-element FP32 constants, derived on the host in double as the CPU does.
struct Scalars {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, sqrt_bias2, eps, decay, grad_scale;
};

// runtime/optim/adamw.cpp's loop body; _rn intrinsics keep every operation separately rounded.
__device__ __forceinline__ void adamw_update(float& w, float g_raw, uint16_t& m, uint16_t& v, const Scalars& s) {
  const float g = __fmul_rn(g_raw, s.grad_scale);  // exact for 1
  const uint16_t m_new =
      bf16_from_float(__fadd_rn(__fmul_rn(s.beta1, float_from_bf16(m)), __fmul_rn(s.one_minus_beta1, g)));
  const uint16_t v_new = bf16_from_float(
      __fadd_rn(__fmul_rn(s.beta2, float_from_bf16(v)), __fmul_rn(s.one_minus_beta2, __fmul_rn(g, g))));
  m = m_new;
  v = v_new;
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(float_from_bf16(v_new)), s.sqrt_bias2), s.eps);
  w = __fsub_rn(__fmul_rn(w, s.decay), __fmul_rn(s.step_size, __fdiv_rn(float_from_bf16(m_new), denom)));
}

// The update's grad_scale from the device (clip_factor's) where given: false where it is NaN (the step is skipped).
__device__ __forceinline__ bool take_device_grad_scale(const float* device_grad_scale, Scalars& s) {
  if (device_grad_scale == nullptr) return true;
  const float f = *device_grad_scale;
  s.grad_scale = f;
  return f == f;
}

// adamw_step's checks (moerl::Error naming the bad scalar) and its FP32 constants, derived in double as the CPU does.
Scalars scalars_of(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t t,
                   float grad_scale);

}  // namespace moerl::cuda::adamw_detail
