#include "kernels/router.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "tests/support/gradcheck.hpp"

namespace moerl {
namespace {

cpu::RouterSpec spec_of(int64_t E, int64_t K, int64_t G, int64_t topk_group, bool norm = true, float scale = 1.0f) {
  cpu::RouterSpec s;
  s.n_experts = E;
  s.top_k = K;
  s.n_group = G;
  s.topk_group = topk_group;
  s.norm_topk_prob = norm;
  s.routed_scaling_factor = scale;
  return s;
}

// Logits whose sigmoids are the given scores (0 < s < 1).
std::vector<float> logits_for(const std::vector<float>& scores) {
  std::vector<float> l;
  for (float s : scores) l.push_back(std::log(s / (1.0f - s)));
  return l;
}

struct Routed {
  std::vector<float> scores;
  std::vector<int32_t> idx;
  std::vector<float> weight;
};

Routed route(const cpu::RouterSpec& spec, const std::vector<float>& logits, const std::vector<float>& bias) {
  const int64_t T = static_cast<int64_t>(logits.size()) / spec.n_experts;
  Routed r{std::vector<float>(logits.size()), std::vector<int32_t>(T * spec.top_k),
           std::vector<float>(T * spec.top_k)};
  cpu::router_forward(spec, logits.data(), bias.data(), T, r.scores.data(), r.idx.data(), r.weight.data());
  return r;
}

std::vector<float> normal_values(int64_t n, float stddev, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

TEST(Router, ChoosesTopKWithinTheBestGroups) {
  // 4 groups of 2. Expert 0 has the best score, but its group's top-2 sum (1.0) loses to groups 1 (1.2) and
  // 2 (1.1): the choice is the top 3 of experts 2..5, ranked by score, ties to the lower index.
  const std::vector<float> s = {0.95f, 0.05f, 0.6f, 0.6f, 0.55f, 0.55f, 0.1f, 0.1f};
  Routed r = route(spec_of(8, 3, 4, 2), logits_for(s), std::vector<float>(8, 0.0f));
  EXPECT_EQ(r.idx, (std::vector<int32_t>{2, 3, 4}));
}

TEST(Router, WorksWithASingleGroup) {
  const std::vector<float> s = {0.2f, 0.9f, 0.4f, 0.7f};
  Routed r = route(spec_of(4, 2, 1, 1), logits_for(s), std::vector<float>(4, 0.0f));
  EXPECT_EQ(r.idx, (std::vector<int32_t>{1, 3}));
}

TEST(Router, UsesTheBiasToChooseAndTheUnbiasedScoresToWeigh) {
  // Biased scores b = s + bias = [0.9, -0.2, 1.0, 0.2]: experts 2 then 0, although s ranks 0 and 1 first.
  const std::vector<float> s = {0.9f, 0.8f, 0.3f, 0.2f};
  const std::vector<float> bias = {0.0f, -1.0f, 0.7f, 0.0f};
  const std::vector<float> logits = logits_for(s);
  Routed r = route(spec_of(4, 2, 1, 1, /*norm=*/true, /*scale=*/2.5f), logits, bias);
  ASSERT_EQ(r.idx, (std::vector<int32_t>{2, 0}));
  // The weights come from s (recovered through log/sigmoid: a few ulp, hence 1e-6), normalized, times 2.5.
  EXPECT_NEAR(r.weight[0], 2.5 * 0.3 / 1.2, 1e-6);
  EXPECT_NEAR(r.weight[1], 2.5 * 0.9 / 1.2, 1e-6);

  Routed raw = route(spec_of(4, 2, 1, 1, /*norm=*/false, /*scale=*/2.5f), logits, bias);
  EXPECT_NEAR(raw.weight[0], 2.5 * 0.3, 1e-6);
  EXPECT_NEAR(raw.weight[1], 2.5 * 0.9, 1e-6);
}

TEST(Router, BreaksTiesTowardTheLowerIndex) {
  // Every score 0.5: every group ties and every expert ties, in each of 3 identical tokens.
  Routed grouped = route(spec_of(8, 3, 4, 2), std::vector<float>(24, 0.0f), std::vector<float>(8, 0.0f));
  EXPECT_EQ(grouped.idx, (std::vector<int32_t>{0, 1, 2, 0, 1, 2, 0, 1, 2}));
  // Ties only within the winning group: experts 5 and 6 tie, 5 comes first.
  const std::vector<float> s = {0.1f, 0.1f, 0.1f, 0.1f, 0.3f, 0.8f, 0.8f, 0.2f};
  Routed r = route(spec_of(8, 2, 2, 1), logits_for(s), std::vector<float>(8, 0.0f));
  EXPECT_EQ(r.idx, (std::vector<int32_t>{5, 6}));
}

TEST(Router, NeverChoosesExpertsOutsideTheKeptGroupsEvenOverNegativeBiasedScores) {
  // Group 0 (b = 0.9, -0.5; sum 0.4) beats group 1 (b = 0.1, 0.1; sum 0.2). K = 2 must take expert 1 with b < 0:
  // DeepSeek's -inf mask. HF's 0.0 mask would take expert 2 (masked to 0 > -0.5) instead.
  const std::vector<float> s = {0.9f, 0.5f, 0.1f, 0.1f};
  Routed r = route(spec_of(4, 2, 2, 1), logits_for(s), {0.0f, -1.0f, 0.0f, 0.0f});
  EXPECT_EQ(r.idx, (std::vector<int32_t>{0, 1}));
}

TEST(Router, GatingWeightBackwardMatchesFiniteDifferencesForAFixedChoice) {
  const int64_t T = 5, E = 8, K = 3;
  for (bool norm : {true, false}) {
    const cpu::RouterSpec spec = spec_of(E, K, 2, 1, norm, 2.5f);
    std::vector<float> logits = normal_values(T * E, 1.5f, 11), bias = normal_values(E, 0.1f, 12);
    const std::vector<float> r = normal_values(T * K, 1.0f, 13);
    const Routed base = route(spec, logits, bias);
    std::vector<float> dlogits(T * E), scores(T * E), weight(T * K);
    cpu::router_backward(spec, base.scores.data(), base.idx.data(), r.data(), nullptr, T, dlogits.data());
    auto loss = [&] {
      for (int64_t i = 0; i < T * E; ++i) scores[i] = 1.0f / (1.0f + std::exp(-logits[i]));
      cpu::router_weights(spec, scores.data(), base.idx.data(), T, weight.data());
      return test::dot_double(weight.data(), r.data(), T * K);
    };
    // FP32 rounding of the K weights a step moves (~1e-7 · 2.5 each) over 2h, plus truncation h²/6 · |∂³L|:
    // measured worst error 1.9e-4 at h = 1e-3 (rounding), 1.8e-5 at h = 1e-2. Gradients are 1e-2 .. 1.
    test::GradCheckReport rep =
        test::gradcheck(loss, logits.data(), T * E, dlogits.data(), {.step = 1e-2, .atol = 1e-4, .rtol = 1e-3});
    EXPECT_EQ(rep.failures, 0) << rep.describe(norm ? "dlogits (norm_topk_prob)" : "dlogits");
    // Unchosen experts get exactly no gradient from the weights.
    for (int64_t t = 0; t < T; ++t)
      for (int64_t e = 0; e < E; ++e) {
        bool chosen = false;
        for (int64_t k = 0; k < K; ++k) chosen |= base.idx[t * K + k] == e;
        if (!chosen) {
          EXPECT_EQ(dlogits[t * E + e], 0.0f) << "token " << t << " expert " << e;
        }
      }
  }
}

TEST(Router, BalanceLossIsAlphaForUniformScores) {
  // s' = 1/E for every expert gives P_i = 1/E, and Σ_i f_i = E whatever the choice: L = alpha · Σ f_i / E = alpha.
  const int64_t B = 2, S = 3, E = 8, K = 2;
  const cpu::RouterSpec spec = spec_of(E, K, 2, 1);
  Routed r = route(spec, std::vector<float>(B * S * E, 0.3f), normal_values(E, 0.1f, 5));
  const float loss = cpu::router_balance_loss(spec, r.scores.data(), r.idx.data(), B, S, 0.01f, nullptr);
  EXPECT_NEAR(loss, 0.01f, 1e-8);  // double accumulation, one FP32 rounding of 0.01
}

TEST(Router, BalanceLossIsLargestWhenTheChosenExpertsHoldTheScore) {
  // One sequence, K = 1: every token picks expert 0 and puts almost all of its score there, so
  // f_0 = E and P_0 -> 1: L -> alpha · E; spreading the tokens over all experts brings it back to ~alpha.
  const int64_t S = 4, E = 4;
  const cpu::RouterSpec spec = spec_of(E, 1, 1, 1);
  std::vector<float> logits(S * E, -8.0f);
  for (int64_t t = 0; t < S; ++t) logits[t * E] = 8.0f;
  Routed r = route(spec, logits, std::vector<float>(E, 0.0f));
  // s_0 = sigmoid(8) ≈ 0.99966, the others sigmoid(-8) ≈ 3.4e-4: P_0 = 0.99897, L = 4 · 0.99897.
  EXPECT_NEAR(cpu::router_balance_loss(spec, r.scores.data(), r.idx.data(), 1, S, 1.0f, nullptr), 3.9959, 1e-3);
  for (int64_t t = 0; t < S; ++t) std::swap(logits[t * E], logits[t * E + t]);
  r = route(spec, logits, std::vector<float>(E, 0.0f));
  EXPECT_NEAR(cpu::router_balance_loss(spec, r.scores.data(), r.idx.data(), 1, S, 1.0f, nullptr), 1.0, 1e-3);
}

TEST(Router, BalanceLossBackwardMatchesFiniteDifferences) {
  const int64_t B = 2, S = 4, E = 8, K = 2, T = B * S;
  const cpu::RouterSpec spec = spec_of(E, K, 2, 1);
  std::vector<float> logits = normal_values(T * E, 1.5f, 21);
  const Routed base = route(spec, logits, std::vector<float>(E, 0.0f));
  std::vector<float> dscores(T * E, 0.0f), dlogits(T * E), scores(T * E);
  const std::vector<float> no_weight_grad(T * K, 0.0f);
  const float alpha = 0.5f;
  cpu::router_balance_loss(spec, base.scores.data(), base.idx.data(), B, S, alpha, dscores.data());
  cpu::router_backward(spec, base.scores.data(), base.idx.data(), no_weight_grad.data(), dscores.data(), T,
                       dlogits.data());
  auto loss = [&] {
    for (int64_t i = 0; i < T * E; ++i) scores[i] = 1.0f / (1.0f + std::exp(-logits[i]));
    return static_cast<double>(cpu::router_balance_loss(spec, scores.data(), base.idx.data(), B, S, alpha, nullptr));
  };
  // The loss is accumulated in double but returned in FP32 (~0.5, ulp 6e-8): with h = 1e-2 that noise is
  // 6e-8 / 2e-2 = 3e-6, plus truncation h²/6 · |∂³L|; measured worst error 2.8e-6. Gradients are ~1e-3.
  test::GradCheckReport rep =
      test::gradcheck(loss, logits.data(), T * E, dlogits.data(), {.step = 1e-2, .atol = 2e-5, .rtol = 1e-3});
  EXPECT_EQ(rep.failures, 0) << rep.describe("dlogits (balance loss)");
}

}  // namespace
}  // namespace moerl
