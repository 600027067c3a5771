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

__device__ __forceinline__ int warp_max(int v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = max(v, __shfl_xor_sync(0xFFFFFFFFu, v, offset));
  return v;
}

// The last g in [0, n) with bounds[g] <= r (bounds [n + 1] non-decreasing, bounds[0] <= r < bounds[n]; empty
// groups, equal bounds, are skipped that way): the number of group starts bounds[1 .. n - 1] at or before r,
// counted by the whole warp at once, 32 starts a round, instead of a binary search's chain of dependent loads.
// Every lane of the warp must call it, with the same r. (A binary search per thread and output, 6 loads deep at 64
// groups, was 14.5% of the SwiGLU backward's instructions and 22% of its stall samples: ncu on the H200, MoE layer
// bench, 2026-11-30, bench/results/2026-11-30-gpu-ncu-h200-dde0e97.txt.)
__device__ __forceinline__ int64_t warp_group_index(const int64_t* bounds, int64_t n, int64_t r) {
  const int lane = threadIdx.x % kWarp;
  int64_t count = 0;
  for (int64_t base = 1; base < n; base += kWarp) {
    const int64_t i = base + lane;
    count += __popc(__ballot_sync(0xFFFFFFFFu, i < n && bounds[i] <= r));
  }
  return count;
}

// abs_bits of the largest |v| over acc's and v's values, as a float: fmaxf (FMNMX with |.| operands, 1
// instruction an element against 4 for abs_bits and an integer max) ignores a NaN unless both are, and orders
// non-negative floats as their bit patterns, so abs_bits(abs_max4(.. abs_max4(0, v) ..)) is the integer max of
// abs_bits over all the values (0 if all are NaN, as on the CPU).
__device__ __forceinline__ float abs_max4(float acc, const float (&v)[4]) {
  return fmaxf(acc, fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3]))));
}

// RN(max(amax, 1e-4) / 448) as the CPU computes it, without a division: Markstein's correction (see Divisor
// below) with the reciprocal pair of 448, hi = RN(1/448) and lo = RN((1 - 448 hi) hi). Checked on the CPU
// against the division for every float from 1e-4 to FLT_MAX; Inf (whose FMAs give NaN) gives Inf.
__device__ __forceinline__ float scale_from_amax_bits(int amax_bits) {
  constexpr float hi = 0x1.24924ap-9f, lo = -0x1.b6db7p-34f;
  const float a = fmaxf(__int_as_float(amax_bits), kMinAmax);
  const float q0 = __fmaf_rn(a, hi, __fmul_rn(a, lo));
  const float q = __fmaf_rn(__fmaf_rn(-q0, kE4M3Max, a), hi, q0);
  return amax_bits == 0x7F800000 ? __int_as_float(0x7F800000) : q;
}

// A tile's scale s with its reciprocal as an unevaluated sum hi + lo (hi = RN(1/s), lo = RN((1 - s hi) hi); the
// FMA's 1 - s hi is exact), so that x / s costs 1 FMUL and 3 FFMA instead of a division each (__fdiv_rn: about
// 16 instructions, one of them a MUFU.RCP, since ptxas does not share the reciprocal between divisions by the
// same s). quotient(x) = RN(x / s) exactly, by Markstein's theorem: q0 = RN(x hi + RN(x lo)) is within
// 2^-46 |x / s| of x (hi + lo) before its rounding, so it is a faithful rounding of x / s; then e = x - s q0 is
// exact (FMA) and RN(q0 + e hi) is RN(x / s) since hi = RN(1/s). That needs no underflow: where |x| < 2^-100
// (quotient below 2^-78) the result is still within a few units of 2^-149 of x / s with x's sign (+-0 taken
// from x itself), so the E4M3 code (0 below 2^-10) is the same. lo would underflow for s > 2^100 (`exact`
// false): there x 2^-64 / (s 2^-64) is used (both exact where it matters: below 2^-62, x 2^-64 may round but
// x / s < 2^-162 codes to +-0 anyway); s = Inf (an Inf in the tile) takes x · 0 (x / Inf: +-0, NaN for Inf
// and NaN). Checked on the CPU with the same operations against x / s: all 2^32 x for nine scales (every code
// equal where |x| <= 449 s, as a tile's values are; beyond, only x / s overflowing to Inf differs), x in
// [-amax, amax] (and any bits) for 4 million random scales up to 2^100 and 2 million above and Inf: every code
// equal, and every quotient with |x|, |x / s| >= 2^-100 bit for bit.
struct Divisor {
  float scale;   // s
  float hi, lo;  // the reciprocal pair of s (exact), else of s 2^-64 (or of 1 for s = Inf)
  bool exact;    // s <= 2^100
};

__device__ __forceinline__ Divisor divisor(float scale) {
  const bool exact = scale <= 0x1p100f;
  const float s = exact ? scale : scale <= 0x1.fffffep127f ? scale * 0x1p-64f : 1.0f;
  // (__frcp_rn's fast path without its range check, cuda::swiglu_detail::rcp_rn_in_range: s is always in its range,
  // but quantize_1x128_dual ran 3.13 against 3.18 TB/s with it, the others within noise; bench/results/
  // 2026-11-30-gpu-divisor-rcp-h200-3aa7871+rcp.txt.)
  const float hi = __frcp_rn(s);
  return Divisor{scale, hi, __fmul_rn(__fmaf_rn(-s, hi, 1.0f), hi), exact};
}

// RN(x / s) from s's reciprocal pair hi, lo (see Divisor), as RN(|x| / s) with x's sign bit OR-ed in: for
// |x| = 0 every step gives +0 (a zero sum of +0 and -0 is +0 when rounding to nearest), so +-0 / s keeps x's sign
// without a comparison and a select (one LOP3 instead: 5 instructions an element, not 6). A NaN x comes out NaN of
// either sign, which the conversion makes 0x7F as the CPU does. (quantize_1x128_dual at 8192 x 8192 on the H200:
// 2.66-2.68 TB/s against 2.65-2.66, bench/results/2026-11-30-gpu-sweep-quant-tiles-h200-82ea109.txt.)
__device__ __forceinline__ float quotient(float x, float s, float hi, float lo) {
  const float a = fabsf(x);
  const float q0 = __fmaf_rn(a, hi, __fmul_rn(a, lo));
  const float q = __fmaf_rn(__fmaf_rn(-q0, s, a), hi, q0);
  return __int_as_float(__float_as_int(q) | (__float_as_int(x) & static_cast<int>(0x80000000u)));
}

// x / d.scale for a scale above 2^100 (x 2^-64 / (s 2^-64)) or Inf (x · 0 / 1).
__device__ __forceinline__ float quotient_large(float x, const Divisor& d) {
  const bool finite = d.scale <= 0x1.fffffep127f;
  return quotient(__fmul_rn(x, finite ? 0x1p-64f : 0.0f), finite ? d.scale * 0x1p-64f : 1.0f, d.hi, d.lo);
}

__device__ __forceinline__ uint16_t cvt2(float a, float b) {
  return __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);  // a in the low byte
}

// x / scale by __fdiv_rn: for the 1x128 and the cols32 transposed kernels, which are no faster with
// Divisor (a reciprocal per 4 elements a lane, on the critical path of their short blocks: 1x128 3.49-3.53 TB/s
// against 3.78-3.79 on the H200).
__device__ __forceinline__ uint16_t encode2(float a, float b, float scale) {
  return cvt2(__fdiv_rn(a, scale), __fdiv_rn(b, scale));
}

__device__ __forceinline__ uint32_t encode4(const float (&v)[4], float scale) {
  return uint32_t{encode2(v[0], v[1], scale)} | (uint32_t{encode2(v[2], v[3], scale)} << 16);
}

// The codes of x / (the divisor's scale), 4 values (the first in the low byte), for an exact divisor or not.
template <bool kExact>
__device__ __forceinline__ uint32_t encode4_as(const float (&v)[4], const Divisor& d) {
  uint16_t pair[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float a = v[2 * h], b = v[2 * h + 1];
    pair[h] = kExact ? cvt2(quotient(a, d.scale, d.hi, d.lo), quotient(b, d.scale, d.hi, d.lo))
                     : cvt2(quotient_large(a, d), quotient_large(b, d));
  }
  return uint32_t{pair[0]} | (uint32_t{pair[1]} << 16);
}

// The codes of N groups of 4 values with one divisor (a tile's), out[i] those of v[i], behind one branch on the
// divisor's exactness for all of them: a branch per pair of values cost 3 instructions in 15 (BSSY, BRA, BSYNC;
// ncu on the H200, quantize_1x128_dual at 8192 x 8192, 2026-11-30: 140 of a thread's 1295 instructions). Rounds
// interleaved against it: dual 3.115-3.116 vs 3.048-3.052 TB/s, tiles64 3.86 vs 3.85, bench-600m fp8 280.6-282.5k vs
// 275.2-281.7k tokens/s (bench/results/2026-11-30-gpu-encode-branch-h200-b513d67+encode.txt).
template <int N>
__device__ __forceinline__ void encode4_n(const float (*v)[4], const Divisor& d, uint32_t* out) {
  if (d.exact) {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = encode4_as<true>(v[i], d);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = encode4_as<false>(v[i], d);
  }
}

// 4 consecutive elements from column c of a row with `cols` elements; zero beyond the row's end.
__device__ __forceinline__ void load4(const float* row, int64_t c, int64_t cols, bool vec, float (&v)[4]) {
  if (vec && c + 3 < cols) {
    const float4 f = __ldcs(reinterpret_cast<const float4*>(row + c));
    v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
  } else {
    for (int i = 0; i < 4; ++i) v[i] = c + i < cols ? row[c + i] : 0.0f;
  }
}

// The 4 codes of elements c .. c + 3 of a row (only those < cols are written).
__device__ __forceinline__ void store4(uint8_t* row, int64_t c, int64_t cols, bool vec, uint32_t codes) {
  if (vec && c + 3 < cols) {
    __stcs(reinterpret_cast<unsigned int*>(row + c), codes);
  } else {
    for (int i = 0; i < 4; ++i)
      if (c + i < cols) row[c + i] = static_cast<uint8_t>(codes >> (8 * i));
  }
}

}  // namespace moerl::fp8::cuda::quant_detail
