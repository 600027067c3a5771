// Device helpers shared by the FP8 quantization kernels (kernels/cuda/fp8_quantize.cu, fp8_quantize_tile.cuh):
// the bit-exact pieces of fp8::cpu::quantize_* (kernels/cpu/fp8.cpp). The tile amax is an integer max of |x|'s
// bit patterns with NaN ignored (exactly the CPU's), the scale and x / scale use IEEE round-to-nearest division
// (__fdiv_rn's, without its cost: Divisor below), and the conversion is cvt.rn.satfinite.e4m3x2.f32.
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

// A tile's scale s with its reciprocal as an unevaluated sum hi + lo (hi = RN(1/s), lo = RN((1 - s hi) hi); the
// FMA's 1 - s hi is exact), so that x / s costs 1 FMUL and 3 FFMA instead of a division each (__fdiv_rn: about
// 16 instructions, one of them a MUFU.RCP, since ptxas does not share the reciprocal between divisions by the
// same s). quotient(x) = RN(x / s) exactly, by Markstein's theorem: q0 = RN(x hi + RN(x lo)) is within
// 2^-46 |x / s| of x (hi + lo) before its rounding, so it is a faithful rounding of x / s; then e = x - s q0 is
// exact (FMA) and RN(q0 + e hi) is RN(x / s) since hi = RN(1/s). That needs no underflow: where |x| < 2^-100
// (quotient below 2^-78) the result is still within a few units of 2^-149 of x / s with x's sign (+-0 taken
// from x itself), so the E4M3 code (0 below 2^-10) is the same. lo underflows for s > 2^100 and s = Inf (an Inf
// in the tile) has no reciprocal pair: such scales (`exact` false) take __fdiv_rn. Checked on the CPU with the
// same operations against x / s: all 2^32 x for six scales and x in [-amax, amax] (and any bits) for 4 million
// random scales: every code equal, and every quotient with |x|, |x / s| >= 2^-100 bit for bit.
struct Divisor {
  float s, hi, lo;
  bool exact;
};

__device__ __forceinline__ Divisor divisor(float s) {
  const float hi = __frcp_rn(s);
  return Divisor{s, hi, __fmul_rn(__fmaf_rn(-s, hi, 1.0f), hi), s <= 0x1p100f};
}

// RN(x / d.s) for d.exact (see Divisor).
__device__ __forceinline__ float quotient(float x, const Divisor& d) {
  const float q0 = __fmaf_rn(x, d.hi, __fmul_rn(x, d.lo));
  const float q = __fmaf_rn(__fmaf_rn(-q0, d.s, x), d.hi, q0);
  return x == 0.0f ? x : q;  // +-0 / s keeps x's sign (the FMAs' zero sums may not)
}

__device__ __forceinline__ uint16_t cvt2(float a, float b) {
  return __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);  // a in the low byte
}

__device__ __forceinline__ uint16_t encode2(float a, float b, const Divisor& d) {
  if (d.exact) return cvt2(quotient(a, d), quotient(b, d));
  return cvt2(__fdiv_rn(a, d.s), __fdiv_rn(b, d.s));
}

__device__ __forceinline__ uint32_t encode4(const float (&v)[4], const Divisor& d) {
  uint16_t lo, hi;
  if (d.exact) {
    lo = cvt2(quotient(v[0], d), quotient(v[1], d)), hi = cvt2(quotient(v[2], d), quotient(v[3], d));
  } else {
    lo = cvt2(__fdiv_rn(v[0], d.s), __fdiv_rn(v[1], d.s)), hi = cvt2(__fdiv_rn(v[2], d.s), __fdiv_rn(v[3], d.s));
  }
  return uint32_t{lo} | (uint32_t{hi} << 16);
}

}  // namespace moerl::fp8::cuda::quant_detail
