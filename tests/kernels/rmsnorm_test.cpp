#include "kernels/rmsnorm.hpp"

#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <random>
#include <vector>

#include "tests/support/gradcheck.hpp"

namespace moerl {
namespace {

std::vector<float> random_vector(size_t n, uint32_t seed, float mean = 0.0f, float stddev = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(mean, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

TEST(RmsNorm, ForwardMatchesTheFormulaInDouble) {
  const int64_t rows = 7, dim = 33;
  const float eps = 1e-6f;
  auto x = random_vector(rows * dim, 1), w = random_vector(dim, 2, 1.0f, 0.2f);
  std::vector<float> y(x.size()), rstd(rows);
  cpu::rmsnorm_forward(x.data(), w.data(), y.data(), rstd.data(), rows, dim, eps);
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t j = 0; j < dim; ++j) ss += double(x[r * dim + j]) * x[r * dim + j];
    const double s = 1.0 / std::sqrt(ss / dim + eps);
    EXPECT_NEAR(rstd[r], s, 1e-6 * s);  // one FP32 rounding of s
    for (int64_t j = 0; j < dim; ++j) {
      const double want = x[r * dim + j] * s * w[j];
      EXPECT_NEAR(y[r * dim + j], want, 1e-6 * std::fabs(want) + 1e-7);  // a few FP32 roundings
    }
  }
}

TEST(RmsNorm, BackwardMatchesFiniteDifferences) {
  const int64_t rows = 5, dim = 12;
  const float eps = 1e-6f;
  auto x = random_vector(rows * dim, 3), w = random_vector(dim, 4, 1.0f, 0.2f), g = random_vector(rows * dim, 5);
  std::vector<float> y(x.size()), rstd(rows), dx(x.size()), dw(dim, 0.0f);
  auto loss = [&] {
    cpu::rmsnorm_forward(x.data(), w.data(), y.data(), rstd.data(), rows, dim, eps);
    return test::dot_double(y.data(), g.data(), rows * dim);
  };
  loss();
  cpu::rmsnorm_backward(g.data(), x.data(), w.data(), rstd.data(), dx.data(), dw.data(), rows, dim);
  // The FP32 forward makes the loss noisy at ~1e-7 relative (|L| ~ 10), i.e. ~1e-6 / 2h in the estimate, so
  // h is large (5e-2) and Richardson extrapolation removes the h² truncation term. Measured worst error 7e-6
  // (dx) and 2e-6 (dweight); a wrong formula is off by O(|gradient|) ~ 0.1. atol 3e-5, rtol 3e-4.
  const test::GradCheckOptions opt{.step = 5e-2, .atol = 3e-5, .rtol = 3e-4, .richardson = true};
  auto rx = test::gradcheck(loss, x.data(), x.size(), dx.data(), opt);
  EXPECT_EQ(rx.failures, 0) << rx.describe("dx");
  auto rw = test::gradcheck(loss, w.data(), w.size(), dw.data(), opt);
  EXPECT_EQ(rw.failures, 0) << rw.describe("dweight");
}

TEST(RmsNorm, AccumulatesTheWeightGradient) {
  const int64_t rows = 3, dim = 8;
  auto x = random_vector(rows * dim, 6), w = random_vector(dim, 7, 1.0f, 0.2f), dy = random_vector(rows * dim, 8);
  std::vector<float> y(x.size()), rstd(rows), dx(x.size()), dw_once(dim, 0.0f), dw_twice(dim, 0.0f);
  cpu::rmsnorm_forward(x.data(), w.data(), y.data(), rstd.data(), rows, dim, 1e-6f);
  cpu::rmsnorm_backward(dy.data(), x.data(), w.data(), rstd.data(), dx.data(), dw_once.data(), rows, dim);
  for (int i = 0; i < 2; ++i)
    cpu::rmsnorm_backward(dy.data(), x.data(), w.data(), rstd.data(), dx.data(), dw_twice.data(), rows, dim);
  for (int64_t j = 0; j < dim; ++j) EXPECT_EQ(dw_twice[j], 2 * dw_once[j]);  // x + x is exact in FP32
}

TEST(RmsNorm, GivesTheSameBitsOnOneThreadAndOnTwo) {
  // Large enough to take the parallel path.
  const int64_t rows = 300, dim = 256;
  auto x = random_vector(rows * dim, 9), w = random_vector(dim, 10, 1.0f, 0.2f), dy = random_vector(rows * dim, 11);
  auto run = [&](int threads, std::vector<float>& y, std::vector<float>& dx, std::vector<float>& dw) {
    const int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
    std::vector<float> rstd(rows);
    y.resize(x.size());
    dx.resize(x.size());
    dw.assign(dim, 0.0f);
    cpu::rmsnorm_forward(x.data(), w.data(), y.data(), rstd.data(), rows, dim, 1e-6f);
    cpu::rmsnorm_backward(dy.data(), x.data(), w.data(), rstd.data(), dx.data(), dw.data(), rows, dim);
    omp_set_num_threads(saved);
  };
  std::vector<float> y1, dx1, dw1, y2, dx2, dw2;
  run(1, y1, dx1, dw1);
  run(2, y2, dx2, dw2);
  EXPECT_EQ(y1, y2);
  EXPECT_EQ(dx1, dx2);
  EXPECT_EQ(dw1, dw2);
}

}  // namespace
}  // namespace moerl
