#include "kernels/attention.hpp"

#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <random>
#include <vector>

#include "tests/support/gradcheck.hpp"

namespace moerl {
namespace {

std::vector<float> random_vector(size_t n, uint32_t seed, float stddev = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// seq 70 crosses the kernel's 64-row query block, so both the full and the partial block are exercised.
struct Problem {
  int64_t batch = 2, seq = 70, heads = 3, dqk = 5, dv = 4;
  float scale = 1.0f / std::sqrt(5.0f);
  int64_t qk_size() const { return batch * seq * heads * dqk; }
  int64_t v_size() const { return batch * seq * heads * dv; }
  int64_t lse_size() const { return batch * heads * seq; }
};

struct Inputs {
  std::vector<float> q, k, v;
  explicit Inputs(const Problem& p, uint32_t seed)
      // stddev 1.5: scores spread over several units, so softmax is far from uniform
      : q(random_vector(p.qk_size(), seed, 1.5f)), k(random_vector(p.qk_size(), seed + 1, 1.5f)),
        v(random_vector(p.v_size(), seed + 2)) {}
};

std::vector<float> forward(const Problem& p, const Inputs& in, std::vector<float>* lse_out = nullptr) {
  std::vector<float> out(p.v_size()), lse(p.lse_size());
  cpu::attention_forward(in.q.data(), in.k.data(), in.v.data(), out.data(), lse.data(), p.batch, p.seq, p.heads,
                         p.dqk, p.dv, p.scale);
  if (lse_out) *lse_out = lse;
  return out;
}

TEST(Attention, ForwardMatchesNaiveCausalSoftmaxInDouble) {
  const Problem p;
  const Inputs in(p, 1);
  std::vector<float> lse;
  const auto out = forward(p, in, &lse);
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < p.heads; ++h)
      for (int64_t i = 0; i < p.seq; ++i) {
        auto at = [&](int64_t t, int64_t d) { return ((b * p.seq + t) * p.heads + h) * d; };
        std::vector<double> s(i + 1);
        double m = -INFINITY, sum = 0;
        for (int64_t j = 0; j <= i; ++j) {
          double dot = 0;
          for (int64_t c = 0; c < p.dqk; ++c) dot += double(in.q[at(i, p.dqk) + c]) * in.k[at(j, p.dqk) + c];
          s[j] = dot * p.scale;
          m = std::max(m, s[j]);
        }
        for (int64_t j = 0; j <= i; ++j) sum += std::exp(s[j] - m);
        EXPECT_NEAR(lse[(b * p.heads + h) * p.seq + i], m + std::log(sum), 1e-5);  // FP32 exp/log of O(1)
        for (int64_t c = 0; c < p.dv; ++c) {
          double o = 0;
          for (int64_t j = 0; j <= i; ++j) o += std::exp(s[j] - m) / sum * in.v[at(j, p.dv) + c];
          // FP32 scores (|s| ≲ 10, relative 1e-7) feed exp; the weighted sum of O(1) values stays within 1e-5.
          EXPECT_NEAR(out[at(i, p.dv) + c], o, 1e-5) << "b " << b << " h " << h << " row " << i;
        }
      }
}

TEST(Attention, BackwardMatchesFiniteDifferences) {
  Problem p;
  p.batch = 1;
  p.heads = 2;
  p.dqk = 4;
  p.dv = 3;
  p.scale = 0.5f;
  Inputs in(p, 2);
  const auto g = random_vector(p.v_size(), 9);
  std::vector<float> out(p.v_size()), lse(p.lse_size());
  auto loss = [&] {
    cpu::attention_forward(in.q.data(), in.k.data(), in.v.data(), out.data(), lse.data(), p.batch, p.seq, p.heads,
                           p.dqk, p.dv, p.scale);
    return test::dot_double(out.data(), g.data(), p.v_size());
  };
  loss();
  std::vector<float> dq(p.qk_size()), dk(p.qk_size()), dv(p.v_size());
  cpu::attention_backward(g.data(), in.q.data(), in.k.data(), in.v.data(), out.data(), lse.data(), dq.data(),
                          dk.data(), dv.data(), p.batch, p.seq, p.heads, p.dqk, p.dv, p.scale);
  // The FP32 loss (|L| ~ 10) carries ~1e-6 of rounding noise, and more where a perturbation changes a row's
  // maximum, which shifts the rounding of the whole row: the estimate's noise ~1e-6 / 2h biases small steps
  // (h = 1e-3 is off by 4e-4). So h = 5e-2 with Richardson extrapolation (truncation O(h⁴)); measured worst
  // error 4e-5 (dk). atol 1e-4, rtol 1e-3; a wrong formula is off by O(|gradient|) ~ 0.1.
  // 120 evenly spaced elements per tensor cover both query blocks and keep the test fast.
  const test::GradCheckOptions opt{.step = 5e-2, .atol = 1e-4, .rtol = 1e-3, .max_checks = 120, .richardson = true};
  auto rq = test::gradcheck(loss, in.q.data(), p.qk_size(), dq.data(), opt);
  EXPECT_EQ(rq.failures, 0) << rq.describe("dq");
  auto rk = test::gradcheck(loss, in.k.data(), p.qk_size(), dk.data(), opt);
  EXPECT_EQ(rk.failures, 0) << rk.describe("dk");
  auto rv = test::gradcheck(loss, in.v.data(), p.v_size(), dv.data(), opt);
  EXPECT_EQ(rv.failures, 0) << rv.describe("dv");
}

TEST(Attention, LaterTokensDoNotChangeEarlierOutputs) {
  const Problem p;
  Inputs in(p, 3);
  const auto before = forward(p, in);
  // Change query, key and value of token 40 of sequence 0, every head.
  const int64_t t = 40;
  for (int64_t i = 0; i < p.heads * p.dqk; ++i) in.q[t * p.heads * p.dqk + i] += 1.0f, in.k[t * p.heads * p.dqk + i] -= 1.0f;
  for (int64_t i = 0; i < p.heads * p.dv; ++i) in.v[t * p.heads * p.dv + i] += 1.0f;
  const auto after = forward(p, in);
  const int64_t row = p.heads * p.dv;
  // Earlier rows: masked probabilities are exactly 0 and the same GEMM adds exact zeros, so the bits agree.
  for (int64_t i = 0; i < t * row; ++i) ASSERT_EQ(after[i], before[i]) << "element " << i;
  // Later rows see the change (a head whose weight on token 40 is negligible may keep some bits, so per row).
  for (int64_t r = t; r < p.seq; ++r) {
    int changed = 0;
    for (int64_t i = r * row; i < (r + 1) * row; ++i) changed += after[i] != before[i];
    EXPECT_GT(changed, 0) << "row " << r;
  }
  // The other sequence is untouched.
  for (int64_t i = p.seq * row; i < p.v_size(); ++i) ASSERT_EQ(after[i], before[i]);
}

TEST(Attention, GivesTheSameBitsOnOneThreadAndOnTwo) {
  Problem p;
  p.seq = 130;  // large enough for the parallel path
  p.heads = 4;
  const Inputs in(p, 4);
  const auto g = random_vector(p.v_size(), 10);
  auto run = [&](int threads) {
    const int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
    std::vector<float> lse;
    auto out = forward(p, in, &lse);
    std::vector<float> dq(p.qk_size()), dk(p.qk_size()), dv(p.v_size());
    cpu::attention_backward(g.data(), in.q.data(), in.k.data(), in.v.data(), out.data(), lse.data(), dq.data(),
                            dk.data(), dv.data(), p.batch, p.seq, p.heads, p.dqk, p.dv, p.scale);
    omp_set_num_threads(saved);
    out.insert(out.end(), dq.begin(), dq.end());
    out.insert(out.end(), dk.begin(), dk.end());
    out.insert(out.end(), dv.begin(), dv.end());
    return out;
  };
  EXPECT_EQ(run(1), run(2));
}

}  // namespace
}  // namespace moerl
