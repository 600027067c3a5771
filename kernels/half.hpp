// BF16 and FP16 <-> FP32 conversions on the CPU, round to nearest even, NaN kept NaN.
#pragma once
#include <bit>
#include <cmath>
#include <cstdint>

namespace moerl {

inline uint16_t bf16_from_float(float x) {
  uint32_t u = std::bit_cast<uint32_t>(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even on the 16 dropped bits
  return static_cast<uint16_t>(u >> 16);
}
inline float float_from_bf16(uint16_t b) { return std::bit_cast<float>(static_cast<uint32_t>(b) << 16); }
// FP32 rounded to the nearest BF16 value, kept in FP32 (how bf16 storage is emulated on the CPU).
inline float round_bf16(float x) { return float_from_bf16(bf16_from_float(x)); }

inline float float_from_f16(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {  // zero or subnormal: man * 2^-24
    const float v = std::ldexp(static_cast<float>(man), -24);
    return sign ? -v : v;
  }
  return std::bit_cast<float>(sign | ((exp + 112) << 23) | (man << 13));
}

inline uint16_t f16_from_float(float x) {
  const uint32_t u = std::bit_cast<uint32_t>(x);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;                  // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;                 // rounds to >= 65520: Inf
  if (a < 0x38800000u) {                                       // below 2^-14: subnormal or zero
    // Value in units of 2^-24, rounded to nearest even via the FPU (exact for these magnitudes).
    const float units = std::bit_cast<float>(a) * 16777216.0f;
    return sign | static_cast<uint16_t>(std::nearbyint(units));
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u);                  // round the 13 dropped bits to even
  return sign | static_cast<uint16_t>(((r >> 13) - (112u << 10)) & 0xffffu);
}

}  // namespace moerl
