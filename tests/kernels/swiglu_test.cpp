#include "kernels/swiglu.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "tests/support/gradcheck.hpp"

namespace moerl {
namespace {

std::vector<float> normal_values(int64_t n, float stddev, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

TEST(Swiglu, ComputesSiluOfTheGateTimesTheUpProjection) {
  const std::vector<float> g = {0.0f, 1.0f, -1.0f, 20.0f, -20.0f, 0.5f};
  const std::vector<float> u = {3.0f, 2.0f, 2.0f, 1.0f, 1.0f, -4.0f};
  std::vector<float> h(g.size());
  cpu::swiglu_forward(g.data(), u.data(), h.data(), static_cast<int64_t>(g.size()));
  for (size_t i = 0; i < g.size(); ++i) {
    const double expected = g[i] / (1.0 + std::exp(-static_cast<double>(g[i]))) * u[i];
    // A few FP32 roundings (exp, add, divide, multiply): 4 ulp of the result.
    EXPECT_NEAR(h[i], expected, 4 * 1.2e-7 * std::fabs(expected) + 1e-30) << "element " << i;
  }
  EXPECT_EQ(h[0], 0.0f);                 // silu(0) = 0 exactly
}

TEST(Swiglu, BackwardMatchesFiniteDifferences) {
  const int64_t n = 257;
  std::vector<float> g = normal_values(n, 2.0f, 1), u = normal_values(n, 1.0f, 2), r = normal_values(n, 1.0f, 3);
  std::vector<float> h(n), dg(n), du(n);
  cpu::swiglu_backward(r.data(), g.data(), u.data(), dg.data(), du.data(), n);
  auto loss = [&] {
    cpu::swiglu_forward(g.data(), u.data(), h.data(), n);
    return test::dot_double(h.data(), r.data(), n);
  };
  // h = 1e-2: truncation h²/6 · |r u silu'''(g)| ≈ 2e-5 · |r u|; one h element changes per perturbation, so
  // FP32 rounding adds about 1e-7 · |h_i r_i| / 2e-2 ≈ 1e-5. Measured worst error 4.6e-5; atol 1e-4.
  const test::GradCheckOptions opt{.step = 1e-2, .atol = 1e-4, .rtol = 1e-3};
  test::GradCheckReport rg = test::gradcheck(loss, g.data(), n, dg.data(), opt);
  EXPECT_EQ(rg.failures, 0) << rg.describe("dg");
  test::GradCheckReport ru = test::gradcheck(loss, u.data(), n, du.data(), opt);
  EXPECT_EQ(ru.failures, 0) << ru.describe("du");
}

}  // namespace
}  // namespace moerl
