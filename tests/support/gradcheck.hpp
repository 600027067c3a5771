// Finite-difference gradient checks for hand-written backward passes.
//
//   float* w = ...;                      // a parameter or input buffer the loss reads
//   std::vector<float> analytic = ...;   // ∂loss/∂w from the backward pass under test
//   auto loss = [&] { forward(...); return dot_double(y, g); };   // scalar loss, evaluated in double
//   GradCheckReport r = gradcheck(loss, w, n, analytic.data(), {.step = 1e-2, .atol = 1e-4, .rtol = 1e-3});
//   EXPECT_EQ(r.failures, 0) << r.describe("q_b_proj.weight");
//
// Each checked element i is perturbed in place to w_i ± h and restored bit for bit; the numerical gradient is
// the central difference (L(w+) − L(w−)) / (w+ − w−) in double, with the steps actually taken after rounding
// w_i ± h to FP32 (so the rounding of the perturbation itself costs nothing). Its error is the truncation
// term h²/6 · ∂³L plus the FP32 rounding noise of the forward divided by 2h; a test picks h and tolerances
// for its op and says why in a comment. With `richardson` the estimate is (4·D(h) − D(2h)) / 3, which cancels
// the h² term (truncation O(h⁴)) for about the same noise and twice the evaluations: use it for strongly curved
// functions (norms over few channels, softmax), where h small enough for plain differences drowns in noise.
// An element fails when |numeric − analytic| > atol + rtol · |analytic|.
#pragma once
#include <cmath>
#include <cstdint>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

namespace moerl::test {

struct GradCheckOptions {
  double step = 1e-2;        // h, absolute perturbation of each element
  double atol = 1e-4;
  double rtol = 1e-3;
  int64_t max_checks = 0;    // 0: every element; else about this many, evenly spaced (first and last included)
  bool richardson = false;   // extrapolate from steps h and 2h (see the top of this file)
};

struct GradCheckReport {
  int64_t checked = 0;
  int64_t failures = 0;
  double max_abs_error = 0;  // max |numeric − analytic| over checked elements
  int64_t worst_index = -1;  // element with the largest error relative to its tolerance
  double worst_numeric = 0, worst_analytic = 0;

  std::string describe(const std::string& what) const {
    std::ostringstream s;
    s << what << ": " << failures << " of " << checked << " elements off; max |num - ana| = " << max_abs_error
      << "; worst at [" << worst_index << "]: numeric " << worst_numeric << ", analytic " << worst_analytic;
    return s.str();
  }
};

// The central-difference gradient of loss() with respect to x[i], x restored afterwards.
inline double numeric_gradient(const std::function<double()>& loss, float* x, int64_t i, double step) {
  const float saved = x[i];
  const float plus = static_cast<float>(saved + step), minus = static_cast<float>(saved - step);
  x[i] = plus;
  const double l_plus = loss();
  x[i] = minus;
  const double l_minus = loss();
  x[i] = saved;
  return (l_plus - l_minus) / (static_cast<double>(plus) - static_cast<double>(minus));
}

// Compares analytic[0..n) with central differences of loss() over x[0..n) (see the top of this file).
inline GradCheckReport gradcheck(const std::function<double()>& loss, float* x, int64_t n, const float* analytic,
                                 const GradCheckOptions& opt = {}) {
  GradCheckReport r;
  std::vector<int64_t> indices;
  if (opt.max_checks <= 0 || opt.max_checks >= n) {
    for (int64_t i = 0; i < n; ++i) indices.push_back(i);
  } else if (opt.max_checks == 1) {
    indices.push_back(0);
  } else {
    for (int64_t c = 0; c < opt.max_checks; ++c) indices.push_back(c * (n - 1) / (opt.max_checks - 1));
  }
  double worst_ratio = -1;
  for (int64_t i : indices) {
    double num = numeric_gradient(loss, x, i, opt.step);
    if (opt.richardson) num = (4 * num - numeric_gradient(loss, x, i, 2 * opt.step)) / 3;
    const double ana = analytic[i];
    const double err = std::fabs(num - ana);
    const double tol = opt.atol + opt.rtol * std::fabs(ana);
    ++r.checked;
    if (!(err <= tol)) ++r.failures;  // NaN counts as a failure
    if (err > r.max_abs_error || std::isnan(err)) r.max_abs_error = err;
    const double ratio = std::isnan(err) ? INFINITY : err / tol;
    if (ratio > worst_ratio) {
      worst_ratio = ratio;
      r.worst_index = i;
      r.worst_numeric = num;
      r.worst_analytic = ana;
    }
  }
  return r;
}

// Σ a_i · b_i in double: the usual test loss L = Σ y · g, whose gradient with respect to y is g.
inline double dot_double(const float* a, const float* b, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

}  // namespace moerl::test
