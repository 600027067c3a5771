#include "runtime/rl/logprob.hpp"

#include <cmath>
#include <random>

#include <gtest/gtest.h>

#include "tests/rl/tiny_model.hpp"

namespace moerl::rl {
namespace {

// Three sequences of different prompt and response lengths (one response empty).
ScoredBatch example_batch() {
  const std::vector<std::vector<int32_t>> prompts{{0, 4, 5, 13, 6, 7, 14}, {0, 3, 14}, {0, 9, 13, 9, 14}};
  const std::vector<std::vector<int32_t>> responses{{8, 9, 1}, {3, 4, 5, 6, 1}, {}};
  return make_scored_batch(prompts, responses, kTaskPad);
}

std::vector<float> grads(Model& m) {
  std::vector<float> g;
  for (auto& [name, p] : m.params().all()) {
    const float* d = p.grad.data<float>();
    g.insert(g.end(), d, d + p.grad.numel());
  }
  return g;
}

void zero_grads(Model& m) {
  for (auto& [name, p] : m.params().all()) std::fill_n(p.grad.data<float>(), p.grad.numel(), 0.0f);
}

TEST(ScoredBatch, PlacesEachResponseTokenAfterItsPrefix) {
  const ScoredBatch sb = example_batch();
  ASSERT_EQ(sb.batch, 3);
  EXPECT_EQ(sb.seq, 9);  // 7 + 3 - 1 and 3 + 5 - 1 = 7
  EXPECT_EQ(sb.at(0, 0), 6);
  EXPECT_EQ(sb.targets[static_cast<size_t>(sb.at(0, 2))], 1);
  EXPECT_EQ(sb.input_ids[static_cast<size_t>(sb.at(0, 2))], 9);  // the token before the target
  EXPECT_EQ(sb.targets[static_cast<size_t>(sb.at(1, 4))], 1);
  int scored = 0;
  for (int64_t t : sb.targets) scored += t >= 0;
  EXPECT_EQ(scored, 8);
}

TEST(TokenLogProbs, AgreeWithTheModelsCrossEntropy) {
  Model m(testing::tiny_config(true));
  m.init_random(1);
  const ScoredBatch sb = example_batch();
  const std::vector<float> lp = token_log_probs(m, sb, Precision::FP32);
  const std::vector<int64_t> labels = sb.targets;
  ForwardOptions o;
  o.for_backward = false;
  const LossReport r = m.forward(TokenBatch{sb.input_ids.data(), labels.data(), sb.batch, sb.seq}, o);
  double sum = 0;
  for (size_t t = 0; t < lp.size(); ++t) {
    if (sb.targets[t] < 0) {
      EXPECT_EQ(lp[t], 0.0f);
    }
    EXPECT_LE(lp[t], 0.0f);
    sum -= lp[t];
  }
  // Both are log-softmax of the same FP32 logits; the per-token values are stored as float (rel. 6e-8 each).
  EXPECT_NEAR(sum / static_cast<double>(r.tokens), r.loss, 1e-6 * r.loss);
}

TEST(WeightedBackward, WithUniformWeightsEqualsTheCrossEntropyBackward) {
  Model m(testing::tiny_config(true));
  m.init_random(2);
  const ScoredBatch sb = example_batch();
  ForwardOptions o;
  m.forward(TokenBatch{sb.input_ids.data(), sb.targets.data(), sb.batch, sb.seq}, o);
  m.backward();
  const std::vector<float> reference = grads(m);
  zero_grads(m);
  token_log_probs(m, sb, Precision::FP32, true);
  std::vector<float> w(sb.targets.size(), 0.0f);
  for (size_t t = 0; t < w.size(); ++t) w[t] = sb.targets[t] >= 0 ? 1.0f / 8.0f : 0.0f;
  backward_weighted(m, sb, w);
  const std::vector<float> ours = grads(m);
  ASSERT_EQ(ours.size(), reference.size());
  double max_ref = 0, max_diff = 0;
  for (size_t i = 0; i < ours.size(); ++i) {
    max_ref = std::max(max_ref, std::abs(static_cast<double>(reference[i])));
    max_diff = std::max(max_diff, std::abs(static_cast<double>(ours[i]) - reference[i]));
  }
  // dlogits computed in double vs the kernel's FP32 softmax: differences of a few FP32 ulps, propagated.
  EXPECT_LT(max_diff, 1e-5 * max_ref);
  EXPECT_GT(max_ref, 0.0);
}

TEST(WeightedBackward, MatchesFiniteDifferencesOfTheWeightedLogProbs) {
  Model m(testing::tiny_config(false));
  m.init_random(3);
  const ScoredBatch sb = example_batch();
  std::mt19937 rng(4);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> w(sb.targets.size(), 0.0f);
  for (size_t t = 0; t < w.size(); ++t)
    if (sb.targets[t] >= 0) w[t] = u(rng);  // signed, as advantages are
  auto objective = [&] {  // Σ w_t·(−log p_t), in double
    const std::vector<float> lp = token_log_probs(m, sb, Precision::FP32);
    double s = 0;
    for (size_t t = 0; t < w.size(); ++t) s -= w[t] * static_cast<double>(lp[t]);
    return s;
  };
  token_log_probs(m, sb, Precision::FP32, true);
  backward_weighted(m, sb, w);
  int checked = 0;
  for (const char* name : {"lm_head.weight", "model.layers.0.self_attn.kv_b_proj.weight", "model.embed_tokens.weight",
                           "model.layers.1.mlp.down_proj.weight"}) {
    Param& p = m.params().at(name);
    for (int64_t i = 0; i < p.value.numel(); i += p.value.numel() / 5 + 1) {
      float* v = p.value.data<float>() + i;
      const float saved = *v, eps = 1e-2f;
      *v = saved + eps;
      const double up = objective();
      *v = saved - eps;
      const double down = objective();
      *v = saved;
      const double fd = (up - down) / (2.0 * eps);
      const double g = p.grad.data<float>()[i];
      // Central differences in FP32 forwards: truncation O(eps²) and rounding ~1e-7/eps; 2e-3 absolute covers
      // both at these magnitudes (gradients ~1e-2 .. 1).
      EXPECT_NEAR(g, fd, 2e-3 + 2e-2 * std::abs(fd)) << name << "[" << i << "]";
      ++checked;
    }
  }
  EXPECT_GE(checked, 16);
}

}  // namespace
}  // namespace moerl::rl
