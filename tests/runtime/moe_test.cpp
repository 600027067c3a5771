#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/linear.hpp"
#include "kernels/router.hpp"
#include "runtime/error.hpp"
#include "runtime/model/feed_forward.hpp"
#include "tests/support/gradcheck.hpp"

namespace moerl {
namespace {

constexpr const char* kPrefix = "model.layers.1.mlp";

// A small MoE layer: 8 routed experts of width 4, two shared experts (one SwiGLU of width 8), top-2.
ModelConfig small_moe(int64_t n_group, int64_t topk_group, bool norm_topk_prob) {
  ModelConfig c;
  c.hidden_size = 8;
  c.moe_intermediate_size = 4;
  c.n_routed_experts = 8;
  c.n_shared_experts = 2;
  c.num_experts_per_tok = 2;
  c.n_group = n_group;
  c.topk_group = topk_group;
  c.norm_topk_prob = norm_topk_prob;
  c.routed_scaling_factor = 2.5;
  return c;
}

std::vector<float> normal_values(int64_t n, float stddev, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

// Weights ~ N(0, 0.5²) keep activations O(1) at these widths; the correction bias ~ N(0, 0.1²) changes choices.
void randomize(Params& params, uint32_t seed) {
  std::mt19937 rng(seed);
  for (auto& [name, p] : params.all()) {
    const bool bias = name.find("e_score_correction_bias") != std::string::npos;
    std::vector<float> v = normal_values(p.value.numel(), bias ? 0.1f : 0.5f, rng);
    std::copy(v.begin(), v.end(), p.value.data<float>());
  }
}

const float* value(const Params& p, const std::string& name) { return p.at(name).value.data<float>(); }

// down(silu(gate(x)) * up(x)) for one token, in double.
std::vector<double> swiglu_reference(const Params& p, const std::string& prefix, const float* x, int64_t H) {
  const Tensor& wg = p.at(prefix + ".gate_proj.weight").value;
  const int64_t I = wg.dim(0);
  const float* g = wg.data<float>();
  const float* u = value(p, prefix + ".up_proj.weight");
  const float* d = value(p, prefix + ".down_proj.weight");
  std::vector<double> h(I), y(H, 0.0);
  for (int64_t i = 0; i < I; ++i) {
    double gi = 0, ui = 0;
    for (int64_t j = 0; j < H; ++j) {
      gi += static_cast<double>(g[i * H + j]) * x[j];
      ui += static_cast<double>(u[i * H + j]) * x[j];
    }
    h[i] = gi / (1.0 + std::exp(-gi)) * ui;
  }
  for (int64_t j = 0; j < H; ++j)
    for (int64_t i = 0; i < I; ++i) y[j] += d[j * I + i] * h[i];
  return y;
}

cpu::RouterSpec spec_of(const ModelConfig& c) {
  cpu::RouterSpec s;
  s.n_experts = c.n_routed_experts;
  s.top_k = c.num_experts_per_tok;
  s.n_group = c.n_group;
  s.topk_group = c.topk_group;
  s.norm_topk_prob = c.norm_topk_prob;
  s.routed_scaling_factor = static_cast<float>(c.routed_scaling_factor);
  return s;
}

// The router's choice and weights for x [T, H], computed apart from MoeFeedForward: [T, K] each.
struct Choice {
  std::vector<float> scores, weight;
  std::vector<int32_t> idx;
};
Choice route(const ModelConfig& c, const Params& p, const float* x, int64_t T) {
  const int64_t E = c.n_routed_experts, K = c.num_experts_per_tok;
  Choice r{std::vector<float>(T * E), std::vector<float>(T * K), std::vector<int32_t>(T * K)};
  cpu::linear_forward(Precision::FP32, x, value(p, std::string(kPrefix) + ".gate.weight"), r.scores.data(), T, E,
                      c.hidden_size);
  cpu::router_forward(spec_of(c), r.scores.data(), value(p, std::string(kPrefix) + ".gate.e_score_correction_bias"),
                      T, r.scores.data(), r.idx.data(), r.weight.data());
  return r;
}

TEST(MoeFeedForward, ComputesSharedPlusWeightedChosenExperts) {
  const ModelConfig c = small_moe(2, 1, true);
  Params params;
  MoeFeedForward moe(c, params, kPrefix);
  randomize(params, 1);
  const int64_t T = 6, H = c.hidden_size, K = c.num_experts_per_tok;
  std::mt19937 rng(2);
  const std::vector<float> x = normal_values(T * H, 1.0f, rng);
  std::vector<float> y(T * H);
  moe.forward(x.data(), 2, 3, y.data(), Precision::FP32);
  const Choice ch = route(c, params, x.data(), T);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> ref = swiglu_reference(params, std::string(kPrefix) + ".shared_experts", &x[t * H], H);
    for (int64_t k = 0; k < K; ++k) {
      const std::string expert = std::string(kPrefix) + ".experts." + std::to_string(ch.idx[t * K + k]);
      std::vector<double> e = swiglu_reference(params, expert, &x[t * H], H);
      for (int64_t j = 0; j < H; ++j) ref[j] += ch.weight[t * K + k] * e[j];
    }
    // FP32 GEMMs over 8 products and a few roundings per step: ~1e-6 relative; 1e-5 is the whole-model bar vs HF.
    for (int64_t j = 0; j < H; ++j) EXPECT_NEAR(y[t * H + j], ref[j], 1e-5 * (1.0 + std::fabs(ref[j]))) << t;
  }
  std::vector<float> in_place = x;  // y written over x gives the same bits
  moe.forward(in_place.data(), 2, 3, in_place.data(), Precision::FP32);
  EXPECT_EQ(in_place, y);
}

struct GradCase {
  int64_t n_group, topk_group;
  bool norm_topk_prob;
  float balance_alpha;
};

void expect_moe_gradients_match_finite_differences(const GradCase& gc) {
  SCOPED_TRACE("n_group " + std::to_string(gc.n_group) + ", topk_group " + std::to_string(gc.topk_group) +
               ", norm_topk_prob " + std::to_string(gc.norm_topk_prob) + ", alpha " + std::to_string(gc.balance_alpha));
  const ModelConfig c = small_moe(gc.n_group, gc.topk_group, gc.norm_topk_prob);
  Params params;
  MoeFeedForward moe(c, params, kPrefix);
  randomize(params, 3);
  const int64_t B = 2, S = 3, T = B * S, H = c.hidden_size;
  std::mt19937 rng(4);
  std::vector<float> x = normal_values(T * H, 1.0f, rng);
  const std::vector<float> r = normal_values(T * H, 1.0f, rng);
  std::vector<float> y(T * H), dx(T * H);
  // Loss L = Σ y · r + balance loss: dL/dy = r, and the balance loss enters with weight 1.
  params.zero_grad();
  moe.forward(x.data(), B, S, y.data(), Precision::FP32, gc.balance_alpha);
  moe.backward(r.data(), dx.data());

  const std::vector<int32_t> base_choice = route(c, params, x.data(), T).idx;
  int flips = 0;
  auto loss = [&] {
    const float balance = moe.forward(x.data(), B, S, y.data(), Precision::FP32, gc.balance_alpha);
    flips += route(c, params, x.data(), T).idx != base_choice;
    return test::dot_double(y.data(), r.data(), T * H) + balance;
  };
  // The FP32 forward's rounding puts ~5e-6 of noise on L (|L| ≈ 10), divided by 2h; truncation is h²/6 · |∂³L|.
  // Measured over h: 1e-3 -> worst error 4e-3 (noise), 3e-3 -> 1.6e-3, 1e-2 -> 5.5e-4 (both halves ~2e-4).
  // So h = 1e-2 with atol 1e-3; gradients run from 1e-3 to 8, a dropped term costs far more than that.
  const test::GradCheckOptions opt{.step = 1e-2, .atol = 1e-3, .rtol = 1e-3};
  test::GradCheckReport rx = test::gradcheck(loss, x.data(), T * H, dx.data(), opt);
  EXPECT_EQ(rx.failures, 0) << rx.describe("dx");
  int checked = 0;
  for (auto& [name, p] : params.all()) {
    if (!p.trainable) continue;
    test::GradCheckReport rw = test::gradcheck(loss, p.value.data<float>(), p.value.numel(), p.grad.data<float>(), opt);
    EXPECT_EQ(rw.failures, 0) << rw.describe(name);
    ++checked;
  }
  EXPECT_EQ(checked, 1 + 3 * 8 + 3);  // router, 8 experts, shared experts
  // Finite differences mean nothing across a change of the discrete choice.
  EXPECT_EQ(flips, 0) << "a perturbation changed the routing; pick another seed";
  const Tensor& bias_grad = params.at(std::string(kPrefix) + ".gate.e_score_correction_bias").grad;
  for (float g : bias_grad.span<float>()) EXPECT_EQ(g, 0.0f);
}

TEST(MoeFeedForward, GradientsMatchFiniteDifferencesWithGroupsAndBalanceLoss) {
  expect_moe_gradients_match_finite_differences({2, 1, true, 0.5f});
}

TEST(MoeFeedForward, GradientsMatchFiniteDifferencesWithoutNormalizedWeights) {
  expect_moe_gradients_match_finite_differences({2, 1, false, 0.5f});
}

TEST(MoeFeedForward, GradientsMatchFiniteDifferencesWithOneGroupAndNoBalanceLoss) {
  expect_moe_gradients_match_finite_differences({1, 1, true, 0.0f});
}

TEST(MoeFeedForward, ReturnsTheBalanceLossOnlyWhenAlphaIsPositive) {
  const ModelConfig c = small_moe(2, 1, true);
  Params params;
  MoeFeedForward moe(c, params, kPrefix);
  randomize(params, 5);
  const int64_t B = 2, S = 3, T = B * S;
  std::mt19937 rng(6);
  const std::vector<float> x = normal_values(T * c.hidden_size, 1.0f, rng);
  std::vector<float> y(x.size());
  EXPECT_EQ(moe.forward(x.data(), B, S, y.data(), Precision::FP32, 0.0f), 0.0f);
  const Choice ch = route(c, params, x.data(), T);
  const float expected = cpu::router_balance_loss(spec_of(c), ch.scores.data(), ch.idx.data(), B, S, 0.3f, nullptr);
  EXPECT_GT(expected, 0.0f);
  EXPECT_EQ(moe.forward(x.data(), B, S, y.data(), Precision::FP32, 0.3f), expected);
}

// E = 4 experts over H = 4 with gate.weight = 4 · identity: a one-hot token e_j scores sigmoid(4) on expert j
// and 0.5 elsewhere, so it goes to expert j (K = 1, no shared experts).
struct OneHotRouting {
  ModelConfig c;
  Params params;
  std::unique_ptr<MoeFeedForward> moe;
  OneHotRouting() {
    c.hidden_size = 4;
    c.moe_intermediate_size = 2;
    c.n_routed_experts = 4;
    c.n_shared_experts = 0;
    c.num_experts_per_tok = 1;
    c.n_group = 1;
    c.topk_group = 1;
    moe = std::make_unique<MoeFeedForward>(c, params, kPrefix);
    float* w = params.at(std::string(kPrefix) + ".gate.weight").value.data<float>();
    for (int e = 0; e < 4; ++e) w[e * 4 + e] = 4.0f;
  }
  void forward(const std::vector<int>& hot) {
    std::vector<float> x(hot.size() * 4, 0.0f), y(x.size());
    for (size_t t = 0; t < hot.size(); ++t) x[t * 4 + hot[t]] = 1.0f;
    moe->forward(x.data(), 1, static_cast<int64_t>(hot.size()), y.data(), Precision::FP32);
  }
  const float* bias() { return value(params, std::string(kPrefix) + ".gate.e_score_correction_bias"); }
};

TEST(MoeFeedForward, CountsTheTokensRoutedToEachExpert) {
  OneHotRouting m;
  m.forward({0, 0, 1, 2, 0});
  EXPECT_EQ(m.moe->load().tokens_per_expert, (std::vector<int64_t>{3, 1, 1, 0}));
  EXPECT_EQ(m.moe->load().tokens, 5);
  m.forward({3, 3});
  EXPECT_EQ(m.moe->load().tokens_per_expert, (std::vector<int64_t>{0, 0, 0, 2}));
  EXPECT_EQ(m.moe->load().tokens, 2);
}

TEST(MoeFeedForward, UpdateBiasPushesOverloadedExpertsDownAndUnderloadedUp) {
  OneHotRouting m;
  m.moe->update_bias(0.01f);  // before any forward: nothing to balance
  for (int e = 0; e < 4; ++e) EXPECT_EQ(m.bias()[e], 0.0f);
  m.forward({0, 0, 1, 2});    // loads 2, 1, 1, 0; mean 1
  m.moe->update_bias(0.01f);
  EXPECT_EQ(m.bias()[0], -0.01f);
  EXPECT_EQ(m.bias()[1], 0.0f);
  EXPECT_EQ(m.bias()[2], 0.0f);
  EXPECT_EQ(m.bias()[3], 0.01f);
}

// ||a - b|| / ||b|| over whole vectors.
double relative_l2(const std::vector<float>& a, const std::vector<float>& b);

TEST(MoeFeedForward, IsBitwiseDeterministicForAThreadCountAndCloseAcrossThem) {
  // Large enough (512 tokens · 8 experts, 512 · 2 · 32 channels) that the OpenMP loops of router and permute split.
  ModelConfig c = small_moe(2, 1, true);
  c.hidden_size = 32;
  c.moe_intermediate_size = 16;
  const int64_t B = 8, S = 64, T = B * S, H = c.hidden_size;
  std::mt19937 rng(7);
  const std::vector<float> x = normal_values(T * H, 1.0f, rng), dy = normal_values(T * H, 1.0f, rng);
  auto run = [&](int threads, std::vector<float>& y, std::vector<float>& dx, std::vector<float>& grads) {
    omp_set_num_threads(threads);
    Params params;
    MoeFeedForward moe(c, params, kPrefix);
    randomize(params, 8);
    y.resize(T * H);
    dx.resize(T * H);
    moe.forward(x.data(), B, S, y.data(), Precision::FP32, 0.1f);
    moe.backward(dy.data(), dx.data());
    grads.clear();
    for (auto& [name, p] : params.all()) grads.insert(grads.end(), p.grad.span<float>().begin(),
                                                      p.grad.span<float>().end());
  };
  const int saved = omp_get_max_threads();
  std::vector<float> y1, dx1, g1, y2, dx2, g2, y3, dx3, g3;
  run(1, y1, dx1, g1);
  run(2, y2, dx2, g2);
  run(2, y3, dx3, g3);
  omp_set_num_threads(saved);
  // Our own loops split rows, never sums; OpenBLAS (OpenMP build) picks its kernels by thread count, so
  // 1 and 2 threads may differ in the last bits of a GEMM: FP32 rounding, ~1e-7 relative per product.
  EXPECT_LT(relative_l2(y1, y2), 1e-6);
  EXPECT_LT(relative_l2(dx1, dx2), 1e-6);
  EXPECT_LT(relative_l2(g1, g2), 1e-6);
  EXPECT_EQ(y2, y3);  // the same thread count twice: bit for bit (what resuming a run relies on)
  EXPECT_EQ(dx2, dx3);
  EXPECT_EQ(g2, g3);
}

// ||a - b|| / ||b|| over whole vectors.
double relative_l2(const std::vector<float>& a, const std::vector<float>& b) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    norm += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(diff / norm);
}

TEST(MoeFeedForward, RunsItsLinearsInTheRequestedPrecision) {
  ModelConfig c = small_moe(2, 1, true);
  c.hidden_size = 32;
  c.moe_intermediate_size = 16;
  const int64_t B = 2, S = 16, T = B * S, H = c.hidden_size;
  std::mt19937 rng(11);
  const std::vector<float> x = normal_values(T * H, 1.0f, rng), dy = normal_values(T * H, 1.0f, rng);
  auto run = [&](Precision p, std::vector<float>& y, std::vector<float>& dx) {
    Params params;
    MoeFeedForward moe(c, params, kPrefix);
    randomize(params, 12);
    y.resize(T * H);
    dx.resize(T * H);
    moe.forward(x.data(), B, S, y.data(), p);
    moe.backward(dy.data(), dx.data());
  };
  std::vector<float> y32, dx32, y16, dx16, y8, dx8;
  run(Precision::FP32, y32, dx32);
  run(Precision::BF16, y16, dx16);
  run(Precision::FP8, y8, dx8);
  // BF16 rounds each GEMM input to 8 significant bits (≤ 2^-9 relative); E4M3 to 4 (≤ 2^-4, ~3.6 % RMS per
  // value). Measured three GEMMs deep: 0.43 % (BF16) and 5.9 % (FP8) for y and dx; the bounds leave ~2x room
  // and still catch a wrong operand (~100 %). The router stays FP32, so all three route alike.
  EXPECT_NE(y16, y32);
  EXPECT_LT(relative_l2(y16, y32), 2e-2);
  EXPECT_LT(relative_l2(dx16, dx32), 2e-2);
  EXPECT_NE(y8, y32);
  EXPECT_LT(relative_l2(y8, y32), 1e-1);
  EXPECT_LT(relative_l2(dx8, dx32), 1e-1);
}

TEST(MoeFeedForward, RejectsInconsistentRoutingConfigNamingTheField) {
  Params params;
  ModelConfig c = small_moe(2, 3, true);
  try {
    MoeFeedForward moe(c, params, kPrefix);
    FAIL() << "topk_group > n_group accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("topk_group"), std::string::npos) << e.what();
  }
  c = small_moe(4, 1, true);  // one kept group of 2 experts cannot supply 3
  c.num_experts_per_tok = 3;
  EXPECT_THROW(MoeFeedForward(c, params, "other"), Error);
  c = small_moe(3, 1, true);  // 8 experts do not split into 3 groups
  EXPECT_THROW(MoeFeedForward(c, params, "third"), Error);
}

TEST(DenseFeedForward, ComputesSwigluAndMatchesFiniteDifferences) {
  Params params;
  const int64_t H = 8, I = 12, T = 5;
  DenseFeedForward ffn(params, "model.layers.0.mlp", H, I);
  randomize(params, 9);
  std::mt19937 rng(10);
  std::vector<float> x = normal_values(T * H, 1.0f, rng);
  const std::vector<float> r = normal_values(T * H, 1.0f, rng);
  std::vector<float> y(T * H), dx(T * H);
  ffn.forward(x.data(), T, y.data(), Precision::FP32);
  for (int64_t t = 0; t < T; ++t) {
    const std::vector<double> ref = swiglu_reference(params, "model.layers.0.mlp", &x[t * H], H);
    // As in ComputesSharedPlusWeightedChosenExperts.
    for (int64_t j = 0; j < H; ++j) EXPECT_NEAR(y[t * H + j], ref[j], 1e-5 * (1.0 + std::fabs(ref[j])));
  }
  ffn.backward(r.data(), dx.data());
  auto loss = [&] {
    ffn.forward(x.data(), T, y.data(), Precision::FP32);
    return test::dot_double(y.data(), r.data(), T * H);
  };
  // As in the MoE gradient check (same widths and magnitudes; worst error measured here 5.5e-4).
  const test::GradCheckOptions opt{.step = 1e-2, .atol = 1e-3, .rtol = 1e-3};
  test::GradCheckReport rx = test::gradcheck(loss, x.data(), T * H, dx.data(), opt);
  EXPECT_EQ(rx.failures, 0) << rx.describe("dx");
  for (auto& [name, p] : params.all()) {
    test::GradCheckReport rw = test::gradcheck(loss, p.value.data<float>(), p.value.numel(), p.grad.data<float>(), opt);
    EXPECT_EQ(rw.failures, 0) << rw.describe(name);
  }
}

}  // namespace
}  // namespace moerl
