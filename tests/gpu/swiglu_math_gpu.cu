// SwiGLU's device arithmetic shortcuts (kernels/cuda/swiglu_math.cuh) against the operations they replace, bit for
// bit: rcp_rn_in_range against __frcp_rn on every float it is used on, and silu_grads4 against four silu_grads.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/swiglu_math.cuh"
#include "tests/gpu/gpu_test_support.hpp"

namespace moerl {
namespace {

using gpu_test::DeviceBuffer;
using gpu_test::run_seed;
namespace sd = cuda::swiglu_detail;

// Counts the floats with bit patterns in [first, first + n) whose rcp_rn_in_range differs from __frcp_rn, and
// keeps the lowest such pattern (0xFFFFFFFF: none).
__global__ void count_rcp_mismatches(uint32_t first, uint32_t n, unsigned long long* mismatches,
                                     unsigned int* lowest) {
  unsigned long long local = 0;
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const float x = __uint_as_float(first + i);
    if (__float_as_uint(sd::rcp_rn_in_range(x)) != __float_as_uint(__frcp_rn(x))) {
      ++local;
      atomicMin(lowest, first + i);
    }
  }
  if (local != 0) atomicAdd(mismatches, local);
}

__global__ void silu_grads_both_ways(const float* dh, const float* g, const float* u, int64_t groups, float* dg4,
                                     float* du4, float* dg1, float* du1) {
  const int64_t q = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (q >= groups) return;
  float a[4], b[4], c[4], x[4], y[4];
  for (int k = 0; k < 4; ++k) a[k] = dh[4 * q + k], b[k] = g[4 * q + k], c[k] = u[4 * q + k];
  sd::silu_grads4(a, b, c, x, y);
  for (int k = 0; k < 4; ++k) {
    dg4[4 * q + k] = x[k], du4[4 * q + k] = y[k];
    sd::silu_grads(a[k], b[k], c[k], dg1[4 * q + k], du1[4 * q + k]);
  }
}

uint32_t bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

// The fast path's whole range in the SwiGLU backward: 1 + exp(-g) from 1 up to 2^126 (silu_grads4 takes __frcp_rn
// above), 1.06e9 floats.
TEST(SwigluMathGpu, RcpInRangeIsFrcpRnForEveryFloatFrom1Below2To126) {
  const uint32_t first = 0x3F800000u, end = 0x7E800000u;  // 1, 2^126
  DeviceBuffer<unsigned long long> mismatches(1);
  DeviceBuffer<unsigned int> lowest(1);
  CUDA_CHECK(cudaMemset(mismatches.get(), 0, sizeof(unsigned long long)));
  CUDA_CHECK(cudaMemset(lowest.get(), 0xFF, sizeof(unsigned int)));
  count_rcp_mismatches<<<4096, 256>>>(first, end - first, mismatches.get(), lowest.get());
  CUDA_CHECK_LAUNCH();
  CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_EQ(mismatches.download()[0], 0u) << "first differing float bits 0x" << std::hex << lowest.download()[0];
}

// Random groups of 4 with g over [-100, 100] (past -87.3 the denominator 1 + exp(-g) passes 2^126 and Inf), some
// groups mixing in NaN, +-Inf, +-0, subnormals and the band around -87.3 .. -88.7: silu_grads4 gives silu_grads'
// bits for every element, whichever path its group takes.
TEST(SwigluMathGpu, SiluGrads4GivesSiluGradsBitsOnEveryPath) {
  std::mt19937_64 rng(run_seed() + 401);
  std::uniform_real_distribution<float> wide(-100.0f, 100.0f), band(-89.0f, -87.0f);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const float specials[] = {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(), 0.0f, -0.0f, 1e-40f, -1e-40f, -87.33655f,
                            -88.72284f, 88.0f};
  const int64_t groups = 1 << 16, n = 4 * groups;
  std::vector<float> dh(static_cast<size_t>(n)), g(dh.size()), u(dh.size());
  for (size_t i = 0; i < dh.size(); ++i) {
    dh[i] = normal(rng), u[i] = normal(rng);
    const uint64_t pick = rng() % 16;
    g[i] = pick < 10 ? wide(rng) : pick < 13 ? band(rng) : pick < 14 ? specials[rng() % 10] : normal(rng);
  }
  const DeviceBuffer<float> d_dh(dh), d_g(g), d_u(u);
  DeviceBuffer<float> dg4(n), du4(n), dg1(n), du1(n);
  for (auto* out : {&dg4, &du4, &dg1, &du1}) out->poison();
  silu_grads_both_ways<<<static_cast<unsigned>((groups + 255) / 256), 256>>>(
      d_dh.get(), d_g.get(), d_u.get(), groups, dg4.get(), du4.get(), dg1.get(), du1.get());
  CUDA_CHECK_LAUNCH();
  const std::vector<float> a = dg4.download(), b = du4.download(), c = dg1.download(), d = du1.download();
  int64_t bad = 0;
  for (size_t i = 0; i < a.size(); ++i)
    if (bits(a[i]) != bits(c[i]) || bits(b[i]) != bits(d[i])) {
      if (++bad <= 5)
        ADD_FAILURE() << "element " << i << ": g " << g[i] << " dg " << a[i] << " vs " << c[i] << ", du " << b[i]
                      << " vs " << d[i];
    }
  EXPECT_EQ(bad, 0) << "of " << n << " elements, seed " << run_seed();
}

}  // namespace
}  // namespace moerl
