#include <cmath>
#include <random>

#include <gtest/gtest.h>

#include "runtime/error.hpp"
#include "runtime/rl/grpo.hpp"
#include "runtime/rl/ppo.hpp"
#include "runtime/rl/task.hpp"

namespace moerl::rl {
namespace {

TEST(GroupAdvantages, CentreAndScaleEachGroupAlone) {
  const std::vector<float> rewards{1, 0, 0, 0, /*second group*/ 1, 1, 1, 1};
  const std::vector<float> a = group_advantages(rewards, 4, true);
  // Group 1: mean 0.25, population std sqrt(3)/4.
  const double sd = std::sqrt(3.0) / 4.0;
  EXPECT_NEAR(a[0], 0.75 / (sd + 1e-4), 1e-5);
  EXPECT_NEAR(a[1], -0.25 / (sd + 1e-4), 1e-5);
  for (int i = 4; i < 8; ++i) EXPECT_EQ(a[static_cast<size_t>(i)], 0.0f);  // all equal: no signal
  EXPECT_NEAR(group_advantages(rewards, 4, false)[0], 0.75, 1e-6);
  EXPECT_THROW(group_advantages(rewards, 3, true), Error);
}

// One sequence with three scored tokens.
ScoredBatch three_tokens() {
  const std::vector<std::vector<int32_t>> p{{0, 3}}, r{{4, 5, 1}};
  return make_scored_batch(p, r, kTaskPad);
}

double loss_at(const ScoredBatch& sb, std::vector<float> logp, const std::vector<float>& old_lp,
               const std::vector<float>& ref, const std::vector<float>& adv, const std::vector<float>& scale) {
  std::vector<float> w;
  return clipped_policy_loss(sb, logp, old_lp, ref, adv, scale, 0.2f, 0.1f, 0.0f, w).loss;
}

TEST(ClippedPolicyLoss, WeightsAreMinusTheDerivativeInTheLogProbs) {
  const ScoredBatch sb = three_tokens();
  const size_t T = sb.targets.size();
  std::vector<float> logp(T, 0), old_lp(T, 0), ref(T, 0), adv(T, 0), scale(T, 0);
  // Token 0: ratio 1.1 (inside the clip range); token 1: ratio 1.5 with A > 0 (clipped); token 2: ratio 0.5
  // with A > 0 (the unclipped branch is the smaller one: not clipped).
  const float ratios[3] = {1.1f, 1.5f, 0.5f}, advs[3] = {0.7f, 1.3f, 0.9f};
  for (int j = 0; j < 3; ++j) {
    const size_t t = static_cast<size_t>(sb.at(0, j));
    old_lp[t] = -1.0f;
    logp[t] = -1.0f + std::log(ratios[j]);
    ref[t] = -1.2f;
    adv[t] = advs[j];
    scale[t] = 1.0f / 3.0f;
  }
  std::vector<float> w;
  const PolicyLossStats st = clipped_policy_loss(sb, logp, old_lp, ref, adv, scale, 0.2f, 0.1f, 0.0f, w);
  EXPECT_EQ(st.tokens, 3);
  EXPECT_NEAR(st.clip_fraction, 1.0 / 3.0, 1e-9);
  EXPECT_GT(st.kl, 0.0);
  for (int j = 0; j < 3; ++j) {
    const size_t t = static_cast<size_t>(sb.at(0, j));
    std::vector<float> up = logp, down = logp;
    const float h = 1e-3f;
    up[t] += h;
    down[t] -= h;
    const double fd = (loss_at(sb, up, old_lp, ref, adv, scale) - loss_at(sb, down, old_lp, ref, adv, scale)) / (2 * h);
    // Central difference of a smooth piece (no kink within ±h): truncation ~h², float inputs ~1e-7/h.
    EXPECT_NEAR(w[t], -fd, 1e-3) << "token " << j;
  }
  // The clipped token keeps only the KL term's gradient.
  const size_t t1 = static_cast<size_t>(sb.at(0, 1));
  EXPECT_NEAR(w[t1], (1.0 / 3.0) * -0.1 * (1.0 - std::exp(ref[t1] - logp[t1])), 1e-6);
}

TEST(ClippedPolicyLoss, KlIsZeroAtTheReferenceAndPositiveElsewhere) {
  const ScoredBatch sb = three_tokens();
  const size_t T = sb.targets.size();
  std::vector<float> lp(T, -0.5f), adv(T, 0), scale(T, 1), w;
  EXPECT_EQ(clipped_policy_loss(sb, lp, lp, lp, adv, scale, 0.2f, 0.1f, 0.0f, w).kl, 0.0);
  std::vector<float> ref(T, -2.0f);
  EXPECT_GT(clipped_policy_loss(sb, lp, lp, ref, adv, scale, 0.2f, 0.1f, 0.0f, w).kl, 0.0);
}

TEST(Gae, ReducesToMonteCarloAndToTdAtTheExtremes) {
  const std::vector<float> r{0.1f, -0.2f, 1.0f}, v{0.5f, 0.4f, 0.8f};
  const std::vector<float> mc = gae(r, v, 1.0f, 1.0f);
  EXPECT_NEAR(mc[0], (0.1 - 0.2 + 1.0) - 0.5, 1e-6);  // return − V
  EXPECT_NEAR(mc[2], 1.0 - 0.8, 1e-6);
  const std::vector<float> td = gae(r, v, 0.9f, 0.0f);
  EXPECT_NEAR(td[0], 0.1 + 0.9 * 0.4 - 0.5, 1e-6);  // δ_0
  EXPECT_NEAR(td[2], 1.0 - 0.8, 1e-6);              // V after the end is 0
}

TEST(ValueHead, GradientsMatchFiniteDifferences) {
  ValueHead head(4);
  std::mt19937 rng(3);
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (auto& [name, p] : head.params().all())
    for (int64_t i = 0; i < p.value.numel(); ++i) p.value.data<float>()[i] = n(rng);
  std::vector<float> h(12), targets{0.5f, -1.0f, 2.0f}, scale{1.0f, 0.0f, 0.5f}, dh(12);
  for (float& x : h) x = n(rng);
  head.params().zero_grad();
  head.backward(h.data(), 3, targets, scale, dh.data());
  auto loss = [&] {
    ValueHead& hd = head;
    const std::vector<float> v = hd.forward(h.data(), 3);
    double s = 0;
    for (int r = 0; r < 3; ++r) s += 0.5 * scale[r] * (v[r] - targets[r]) * (v[r] - targets[r]);
    return s;
  };
  const float eps = 1e-2f;
  for (int i = 0; i < 12; ++i) {
    const float saved = h[i];
    h[i] = saved + eps;
    const double up = loss();
    h[i] = saved - eps;
    const double down = loss();
    h[i] = saved;
    // The loss is quadratic in h: central differences are exact up to FP32 rounding of the values (~1e-6).
    EXPECT_NEAR(dh[i], (up - down) / (2 * eps), 1e-3) << i;
  }
  Param& w = head.params().at("value_head.weight");
  for (int i = 0; i < 4; ++i) {
    float& x = w.value.data<float>()[i];
    const float saved = x;
    x = saved + eps;
    const double up = loss();
    x = saved - eps;
    const double down = loss();
    x = saved;
    EXPECT_NEAR(w.grad.data<float>()[i], (up - down) / (2 * eps), 1e-3) << i;
  }
}

}  // namespace
}  // namespace moerl::rl
