// GPU tests of the token permutation (kernels/cuda/moe_permute.cu) against the CPU reference
// (kernels/cpu/moe_permute.cpp): plan, gather, combine, combine backward, scatter-add. Random inputs with a fresh
// seed each run (printed; MOERL_TEST_SEED=<n> repeats a run), every output poisoned with NaN / -1 before the kernel,
// one line per comparison, and GB/s lines on the model's sizes. Needs a GPU: skipped without one.
//
// What must be exact: the plan (offsets, token_of, row_of), which decides the rows every later kernel touches;
// gather (it moves bits) and combine backward's dyp (one product per element). Combine and scatter-add are the
// CPU's IEEE operations in the CPU's order, so they are expected bit-identical too (the count of identical values
// is printed); their assertions leave a small tolerance, explained where it is checked.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/moe_permute.hpp"
#include "kernels/moe_permute.hpp"
#include "runtime/error.hpp"
#include "tests/gpu/moe_gpu_support.hpp"

namespace moerl {
namespace {

using moe_gpu_test::DeviceBuffer;
using moe_gpu_test::median_ms;
using moe_gpu_test::normal_values;
using moe_gpu_test::run_seed;
using MoePermuteGpu = moe_gpu_test::GpuTest;

// Uniform in [-1, 1) times 2^e per row (e in [-6, 6]): cheap enough for hundreds of millions of values.
std::vector<float> row_scaled_values(int64_t rows, int64_t dim, uint64_t seed) {
  std::vector<float> v(static_cast<size_t>(rows * dim));
  uint64_t state = seed;
  auto next = [&state]() {  // splitmix64
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  };
  for (int64_t r = 0; r < rows; ++r) {
    const float scale = std::ldexp(1.0f, static_cast<int>(next() % 13) - 6);
    for (int64_t d = 0; d < dim; ++d)
      v[r * dim + d] = scale * (static_cast<float>(next() >> 40) * 0x1.0p-23f - 1.0f);
  }
  return v;
}

// topk_idx [T, K]: K distinct experts per token, drawn with weight ∝ (index + 1)^-skew (skew 0: uniform).
std::vector<int32_t> random_choice(int64_t T, int64_t K, int64_t E, double skew, std::mt19937_64& rng) {
  std::vector<double> w(E);
  for (int64_t e = 0; e < E; ++e) w[e] = std::pow(static_cast<double>(e + 1), -skew);
  std::discrete_distribution<int32_t> pick(w.begin(), w.end());
  std::vector<int32_t> idx(T * K);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < K; ++k) {
      int32_t e;
      do e = pick(rng);
      while (std::find(idx.begin() + t * K, idx.begin() + t * K + k, e) != idx.begin() + t * K + k);
      idx[t * K + k] = e;
    }
  return idx;
}

struct Plan {
  std::vector<int64_t> offsets, token_of, row_of;
};

Plan cpu_plan(const std::vector<int32_t>& idx, int64_t T, int64_t K, int64_t E) {
  Plan p{std::vector<int64_t>(E + 1), std::vector<int64_t>(T * K), std::vector<int64_t>(T * K)};
  cpu::moe_permute_plan(idx.data(), T, K, E, p.offsets.data(), p.token_of.data(), p.row_of.data());
  return p;
}

TEST_F(MoePermuteGpu, PermutePlanIsTheCpusStableSortExactly) {
  std::mt19937_64 rng(run_seed() + 5);
  struct Case {
    int64_t T, K, E;
    double skew;
    bool distinct;
  };
  const Case cases[] = {{1, 1, 1, 0, true},        {7, 3, 8, 0, true},       {1000, 6, 64, 0, true},
                        {1000, 6, 64, 1.5, true},  {16384, 6, 64, 0.5, true}, {16384, 8, 256, 1.0, true},
                        {300, 4, 4096, 0, true},   {5000, 8, 16, 0, false},  {20000, 1, 3, 2.0, true}};
  for (const Case& c : cases) {
    SCOPED_TRACE("T=" + std::to_string(c.T) + " K=" + std::to_string(c.K) + " E=" + std::to_string(c.E));
    std::vector<int32_t> idx;
    if (c.distinct) {
      idx = random_choice(c.T, c.K, c.E, c.skew, rng);
    } else {  // repeated experts within a token: the plan does not care
      std::uniform_int_distribution<int32_t> any(0, static_cast<int32_t>(c.E - 1));
      idx.resize(c.T * c.K);
      for (int32_t& e : idx) e = any(rng);
    }
    const Plan ref = cpu_plan(idx, c.T, c.K, c.E);
    DeviceBuffer<int32_t> d_idx(idx);
    DeviceBuffer<int64_t> d_offsets(c.E + 1), d_token_of(c.T * c.K), d_row_of(c.T * c.K);
    d_offsets.poison();
    d_token_of.poison();
    d_row_of.poison();
    cuda::moe_permute_plan(d_idx.get(), c.T, c.K, c.E, d_offsets.get(), d_token_of.get(), d_row_of.get());
    const bool same = d_offsets.download() == ref.offsets && d_token_of.download() == ref.token_of &&
                      d_row_of.download() == ref.row_of;
    std::printf("moe_permute_plan T=%lld K=%lld E=%lld skew %.1f: %s\n", static_cast<long long>(c.T),
                static_cast<long long>(c.K), static_cast<long long>(c.E), c.skew, same ? "identical" : "DIFFERS");
    EXPECT_TRUE(same);
  }
}

// Gather, combine, combine backward and scatter-add on a CPU plan. `offset` shifts every float buffer by that many
// floats from its 256-byte aligned start (1: the scalar path).
void expect_permute_ops_match_cpu(int64_t T, int64_t K, int64_t E, int64_t H, int offset, uint64_t seed) {
  SCOPED_TRACE("T=" + std::to_string(T) + " K=" + std::to_string(K) + " H=" + std::to_string(H) + " offset " +
               std::to_string(offset) + ", seed " + std::to_string(run_seed()));
  std::mt19937_64 rng(seed);
  const int64_t R = T * K;
  const std::vector<int32_t> idx = random_choice(T, K, E, 1.0, rng);
  const Plan plan = cpu_plan(idx, T, K, E);
  const std::vector<float> x = row_scaled_values(T, H, seed + 1), y0 = row_scaled_values(T, H, seed + 2);
  const std::vector<float> yp = row_scaled_values(R, H, seed + 3), dy = row_scaled_values(T, H, seed + 4);
  const std::vector<float> weight = normal_values(R, 1.0f, rng);
  auto shifted = [offset](const std::vector<float>& v) {
    std::vector<float> s(offset, 0.0f);
    s.insert(s.end(), v.begin(), v.end());
    return s;
  };
  auto unshift = [offset](std::vector<float> v) { return std::vector<float>(v.begin() + offset, v.end()); };

  DeviceBuffer<int64_t> d_token_of(plan.token_of), d_row_of(plan.row_of);
  DeviceBuffer<float> d_x(shifted(x)), d_yp(shifted(yp)), d_dy(shifted(dy)), d_weight(weight);
  DeviceBuffer<float> d_xp(R * H + offset), d_y(shifted(y0)), d_dyp(R * H + offset), d_dweight(R);

  std::vector<float> xp(R * H);
  cpu::moe_gather(x.data(), plan.token_of.data(), R, H, xp.data());
  d_xp.poison();
  cuda::moe_gather(d_x.get() + offset, d_token_of.get(), R, H, d_xp.get() + offset);
  EXPECT_TRUE(unshift(d_xp.download()) == xp) << "gather";

  // Combine and scatter-add: the CPU's operations in its order, expected bit-identical. Tolerance (K + 1) · 2^-22
  // of the sum of |terms|: room for a host compiler that fuses the multiply-adds (one rounding fewer per term,
  // each at most an ulp of a partial sum, which is at most the sum of |terms|).
  auto check_sum = [&](const char* what, const std::vector<float>& got, const std::vector<float>& ref,
                       const std::vector<float>& w) {
    double worst = 0;
    int64_t same = 0;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t d = 0; d < H; ++d) {
        double mag = std::abs(y0[t * H + d]);
        for (int64_t k = 0; k < K; ++k)
          mag += std::abs((w.empty() ? 1.0 : w[t * K + k]) * yp[plan.row_of[t * K + k] * H + d]);
        const double err = std::abs(double{got[t * H + d]} - ref[t * H + d]);
        worst = std::max(worst, std::isnan(err) ? 1e30 : err / (0x1.0p-22 * mag * (K + 1) + 1e-38));
        same += std::bit_cast<uint32_t>(got[t * H + d]) == std::bit_cast<uint32_t>(ref[t * H + d]);
      }
    std::printf("%s T=%lld K=%lld H=%lld offset %d: worst err / tol %.3g, %lld/%lld bit-identical\n", what,
                static_cast<long long>(T), static_cast<long long>(K), static_cast<long long>(H), offset, worst,
                static_cast<long long>(same), static_cast<long long>(T * H));
    EXPECT_LE(worst, 1.0) << what;
  };
  std::vector<float> y = y0;
  cpu::moe_combine(yp.data(), weight.data(), plan.row_of.data(), T, K, H, y.data());
  cuda::moe_combine(d_yp.get() + offset, d_weight.get(), d_row_of.get(), T, K, H, d_y.get() + offset);
  check_sum("moe_combine", unshift(d_y.download()), y, weight);

  std::vector<float> dx = y0;  // scatter-add of yp's rows onto y0
  cpu::moe_scatter_add(yp.data(), plan.row_of.data(), T, K, H, dx.data());
  d_y.upload(shifted(y0));
  cuda::moe_scatter_add(d_yp.get() + offset, d_row_of.get(), T, K, H, d_y.get() + offset);
  check_sum("moe_scatter_add", unshift(d_y.download()), dx, {});

  // Combine backward: dyp is one product per element (exact match required); dweight a dot product over H summed
  // in another order. Both sums lie within γ_H · Σ|terms| of the exact value (γ_n = n·u / (1 - n·u), u = 2^-24;
  // Higham, Accuracy and Stability, §3.1), so they lie within 2 γ_H · Σ|terms| of each other.
  std::vector<float> dyp(R * H), dweight(R);
  cpu::moe_combine_backward(dy.data(), yp.data(), weight.data(), plan.row_of.data(), T, K, H, dyp.data(),
                            dweight.data());
  d_dyp.poison();
  d_dweight.poison();
  cuda::moe_combine_backward(d_dy.get() + offset, d_yp.get() + offset, d_weight.get(), d_row_of.get(), T, K, H,
                             d_dyp.get() + offset, d_dweight.get());
  EXPECT_TRUE(unshift(d_dyp.download()) == dyp) << "combine backward: dyp";
  const std::vector<float> g_dweight = d_dweight.download();
  const double u = 0x1.0p-24, gamma = H * u / (1 - H * u);
  double worst = 0;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < K; ++k) {
      double abs_sum = 0;
      const float* row = yp.data() + plan.row_of[t * K + k] * H;
      for (int64_t d = 0; d < H; ++d) abs_sum += std::abs(double{dy[t * H + d]} * row[d]);
      const double err = std::abs(double{g_dweight[t * K + k]} - dweight[t * K + k]);
      worst = std::max(worst, std::isnan(err) ? 1e30 : err / (2 * gamma * abs_sum + 1e-38));
    }
  std::printf("moe_combine_backward T=%lld K=%lld H=%lld offset %d: dyp identical; dweight worst err / tol %.3g "
              "(tol 2 gamma_H sum|terms|)\n",
              static_cast<long long>(T), static_cast<long long>(K), static_cast<long long>(H), offset, worst);
  EXPECT_LE(worst, 1.0);
}

TEST_F(MoePermuteGpu, GatherCombineAndTheirBackwardMatchTheCpu) {
  expect_permute_ops_match_cpu(1000, 6, 64, 2048, 0, run_seed() + 6);  // float4 path
  expect_permute_ops_match_cpu(777, 8, 256, 301, 0, run_seed() + 7);   // dim % 4 != 0: scalar path
  expect_permute_ops_match_cpu(500, 6, 64, 512, 1, run_seed() + 8);    // misaligned pointers: scalar path
  expect_permute_ops_match_cpu(1024, 8, 256, 7168, 0, run_seed() + 9); // DeepSeek-V3's hidden size
  expect_permute_ops_match_cpu(33, 9, 16, 64, 0, run_seed() + 10);     // K not a multiple of the 4 rows in flight
}

TEST_F(MoePermuteGpu, PermuteRefusesBadArguments) {
  EXPECT_THROW(cuda::moe_permute_plan(nullptr, -1, 6, 64, nullptr, nullptr, nullptr), Error);
  EXPECT_THROW(cuda::moe_permute_plan(nullptr, 10, 6, 0, nullptr, nullptr, nullptr), Error);
  EXPECT_THROW(cuda::moe_permute_plan(nullptr, 10, 6, 64, nullptr, nullptr, nullptr), Error);  // null offsets
  EXPECT_THROW(cuda::moe_combine(nullptr, nullptr, nullptr, 10, 6, 64, nullptr), Error);
  EXPECT_NO_THROW(cuda::moe_combine(nullptr, nullptr, nullptr, 0, 6, 64, nullptr));  // empty: nothing launched
  // No tokens: every expert gets an empty range.
  DeviceBuffer<int64_t> d_offsets(65);
  d_offsets.poison();
  cuda::moe_permute_plan(nullptr, 0, 6, 64, d_offsets.get(), nullptr, nullptr);
  EXPECT_EQ(d_offsets.download(), std::vector<int64_t>(65, 0));
}

TEST_F(MoePermuteGpu, ReportsPermuteAndCombineBandwidth) {
  const int64_t T = 16384, K = 6, E = 64, H = 2048, R = T * K;
  std::mt19937_64 rng(run_seed() + 11);
  DeviceBuffer<int32_t> d_idx(random_choice(T, K, E, 0.5, rng));
  DeviceBuffer<int64_t> d_offsets(E + 1), d_token_of(R), d_row_of(R);
  DeviceBuffer<float> d_x(T * H), d_y(T * H), d_weight(R), d_xp(R * H), d_yp(R * H), d_dweight(R);
  CUDA_CHECK(cudaMemset(d_x.get(), 0, T * H * sizeof(float)));
  CUDA_CHECK(cudaMemset(d_y.get(), 0, T * H * sizeof(float)));
  CUDA_CHECK(cudaMemset(d_weight.get(), 0, R * sizeof(float)));
  CUDA_CHECK(cudaMemset(d_yp.get(), 0, R * H * sizeof(float)));
  const double row_bytes = 4.0 * R * H, token_bytes = 4.0 * T * H;
  auto report = [](const char* what, double ms, double bytes) {
    std::printf("%s T=16384 K=6 H=2048: %.1f us, %.0f GB/s\n", what, ms * 1e3, bytes / (ms * 1e-3) / 1e9);
  };
  const double plan_ms = median_ms([&] {
    cuda::moe_permute_plan(d_idx.get(), T, K, E, d_offsets.get(), d_token_of.get(), d_row_of.get());
  });
  report("moe_permute_plan", plan_ms, 4.0 * R + 16.0 * R);  // indices in, token_of and row_of out
  const double gather_ms = median_ms([&] { cuda::moe_gather(d_x.get(), d_token_of.get(), R, H, d_xp.get()); });
  report("moe_gather", gather_ms, 2 * row_bytes);  // each permuted row read (L2 or HBM) and written
  const double combine_ms = median_ms(
      [&] { cuda::moe_combine(d_yp.get(), d_weight.get(), d_row_of.get(), T, K, H, d_y.get()); });
  report("moe_combine", combine_ms, row_bytes + 2 * token_bytes);  // rows read, y read and written
  report("permute+combine (plan, gather, combine)", plan_ms + gather_ms + combine_ms,
         4.0 * R + 16.0 * R + 3 * row_bytes + 2 * token_bytes);
  const double backward_ms = median_ms([&] {
    cuda::moe_combine_backward(d_y.get(), d_yp.get(), d_weight.get(), d_row_of.get(), T, K, H, d_xp.get(),
                               d_dweight.get());
  });
  report("moe_combine_backward", backward_ms, 2 * row_bytes + token_bytes);  // yp read, dyp written, dy read
  const double scatter_ms =
      median_ms([&] { cuda::moe_scatter_add(d_xp.get(), d_row_of.get(), T, K, H, d_x.get()); });
  report("moe_scatter_add", scatter_ms, row_bytes + 2 * token_bytes);
}

}  // namespace
}  // namespace moerl
