// Helpers of the MoE GPU tests (moe_routing_gpu.cpp, moe_permute_gpu.cpp, moe_experts_gpu.cpp, ...): random values,
// relative errors, beside the seed, device buffers, fixture and timing of gpu_test_support.hpp.
#pragma once
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <vector>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/half.hpp"
#include "runtime/error.hpp"
#include "tests/gpu/gpu_test_support.hpp"

namespace moerl::moe_gpu_test {

using gpu_test::DeviceBuffer;
using gpu_test::GpuTest;
using gpu_test::run_seed;

// ‖a − b‖₂ / ‖b‖₂ over n values in double; non-finite -> infinity (fails any bound); both zero -> 0 (an expert
// with no tokens).
inline double rel_l2(const float* a, const float* b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += static_cast<double>(b[i]) * b[i];
  }
  if (!std::isfinite(num)) return std::numeric_limits<double>::infinity();
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}
inline double rel_l2(const std::vector<float>& got, const std::vector<float>& ref) {
  return rel_l2(got.data(), ref.data(), ref.size());
}

inline std::vector<float> normal_values(size_t n, float stddev, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

using gpu_test::median_ms;

// BF16 outputs `got` against the FP32 values `want` another kernel gave for the same sums (a BF16 epilogue may sum
// in another order): `apart` counts the values that are not want's nearest BF16, `beyond` those farther than one
// BF16 unit (2^-7 relative), NaN, or not +0 where want is zero.
struct Bf16Rounding {
  int64_t apart = 0, beyond = 0;
};
inline Bf16Rounding compare_bf16_rounding(const std::vector<uint16_t>& got, const std::vector<float>& want) {
  Bf16Rounding r;
  for (size_t i = 0; i < want.size(); ++i) {
    const float g = float_from_bf16(got[i]);
    r.beyond += !(std::fabs(g - want[i]) <= std::ldexp(std::fabs(want[i]), -7)) || (want[i] == 0.0f && got[i] != 0);
    r.apart += got[i] != bf16_from_float(want[i]);
  }
  return r;
}

}  // namespace moerl::moe_gpu_test
