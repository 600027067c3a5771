// Helpers of the MoE GPU tests (moe_routing_gpu.cpp, moe_permute_gpu.cpp, moe_experts_gpu.cpp, ...): random values,
// relative errors and CUDA-event timing, beside the seed, device buffers and fixture of gpu_test_support.hpp.
#pragma once
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <random>
#include <vector>

#include "kernels/cuda/cuda_check.hpp"
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

// Median milliseconds of one call of fn over 10 timed runs after 3 warm-ups (CUDA events, default stream).
inline double median_ms(const std::function<void()>& fn) {
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < 3; ++i) fn();
  std::vector<float> ms(10);
  for (float& m : ms) {
    CUDA_CHECK(cudaEventRecord(start));
    fn();
    CUDA_CHECK(cudaEventRecord(stop));
    CUDA_CHECK(cudaEventSynchronize(stop));
    CUDA_CHECK(cudaEventElapsedTime(&m, start, stop));
  }
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  std::sort(ms.begin(), ms.end());
  return (ms[4] + ms[5]) / 2;
}

}  // namespace moerl::moe_gpu_test
