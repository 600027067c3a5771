// Device helpers shared by the FP8 quantization kernels (kernels/cuda/fp8_quantize.cu, fp8_quantize_tile.cuh):
// the bit-exact pieces of fp8::cpu::quantize_* (kernels/cpu/fp8.cpp). The tile amax is an integer max of |x|'s
// bit patterns with NaN ignored (exactly the CPU's), the scale and x / scale use IEEE round-to-nearest division
// (__fdiv_rn: independent of -prec-div / --use_fast_math), and the conversion is cvt.rn.satfinite.e4m3x2.f32.
#pragma once
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/fp8.hpp"

namespace moerl::fp8::cuda::quant_detail {

constexpr int kWarp = 32;
static_assert(kTile == 4 * kWarp, "a warp covers one 128-wide tile row with 4 elements per lane");

__device__ __forceinline__ int abs_bits(float v) {
  const int a = __float_as_int(v) & 0x7FFFFFFF;
  return a > 0x7F800000 ? 0 : a;  // NaN ignored, as on the CPU
}

__device__ __forceinline__ int abs_bits4(const float (&v)[4]) {
  return max(max(abs_bits(v[0]), abs_bits(v[1])), max(abs_bits(v[2]), abs_bits(v[3])));
}

__device__ __forceinline__ int warp_max(int v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = max(v, __shfl_xor_sync(0xFFFFFFFFu, v, offset));
  return v;
}

__device__ __forceinline__ float scale_from_amax_bits(int amax_bits) {
  return __fdiv_rn(fmaxf(__int_as_float(amax_bits), kMinAmax), kE4M3Max);
}

__device__ __forceinline__ uint16_t encode2(float a, float b, float scale) {
  const float2 v = make_float2(__fdiv_rn(a, scale), __fdiv_rn(b, scale));
  return __nv_cvt_float2_to_fp8x2(v, __NV_SATFINITE, __NV_E4M3);  // a in the low byte
}

__device__ __forceinline__ uint32_t encode4(const float (&v)[4], float scale) {
  return uint32_t{encode2(v[0], v[1], scale)} | (uint32_t{encode2(v[2], v[3], scale)} << 16);
}

}  // namespace moerl::fp8::cuda::quant_detail
