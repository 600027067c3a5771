// GPU tests of the router (kernels/cuda/router.cu) against the CPU reference (kernels/cpu/router.cpp).
// Random inputs with a fresh seed each run (printed; MOERL_TEST_SEED=<n> repeats a run), every output poisoned
// with NaN / -1 before the kernel, one line per comparison, and timing lines (CUDA events, median of 10 runs after
// 3 warm-ups) on the model's sizes. Needs a GPU: skipped without one.
//
// What must be exact: the choice (topk_idx): it decides which rows downstream kernels touch. The gating weights and
// the backward are the CPU's IEEE operations in the CPU's order, so they are expected bit-identical (the count of
// identical values is printed); their assertions leave a small tolerance, each explained where it is checked.
//
// The sigmoid. The CPU calls glibc's expf (0.502 ulp, not always correctly rounded: 0.06% of N(0, 2) logits, and
// 0.026% of the sigmoids then differ by an ulp); the GPU rounds a double exp to float (correctly rounded but for
// ~2^-29 of inputs). The random tests nudge each logit up by ulps until the host's expf equals its double exp
// rounded to float (the count is printed), so both sides see the same scores and the choice can be required
// identical without near-ties flipping it by chance.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/router.hpp"
#include "kernels/router.hpp"
#include "runtime/error.hpp"
#include "tests/gpu/moe_gpu_support.hpp"

namespace moerl {
namespace {

using moe_gpu_test::DeviceBuffer;
using moe_gpu_test::median_ms;
using moe_gpu_test::normal_values;
using moe_gpu_test::run_seed;
using MoeRoutingGpu = moe_gpu_test::GpuTest;

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

std::string spec_name(const cpu::RouterSpec& s) {
  return "E=" + std::to_string(s.n_experts) + " K=" + std::to_string(s.top_k) + " groups " +
         std::to_string(s.topk_group) + "/" + std::to_string(s.n_group) + (s.norm_topk_prob ? " norm" : " raw") +
         " x" + std::to_string(s.routed_scaling_factor);
}

// Moves each logit up by ulps until glibc's expf(-x) equals exp(-x) in double rounded to float (see the top).
int64_t nudge_to_correctly_rounded_exp(std::vector<float>& logits) {
  int64_t moved = 0;
  for (float& x : logits) {
    bool m = false;
    while (std::exp(-x) != static_cast<float>(std::exp(-static_cast<double>(x)))) {
      x = std::nextafter(x, std::numeric_limits<float>::infinity());
      m = true;
    }
    moved += m;
  }
  return moved;
}

// Runs both routers on the same logits and requires the same choice; scores within 1 ulp (expected identical
// after the nudge: the host's and the device's double exp can still round differently to float within 2^-29 of a
// float midpoint); weights within 1e-6 relative (identical operations on identical scores give identical bits; 1e-6
// is 8 ulp, room for a 1-ulp score difference through the sum, division and scaling).
void expect_router_matches_cpu(const cpu::RouterSpec& spec, const std::vector<float>& logits,
                               const std::vector<float>& bias, bool in_place) {
  const int64_t E = spec.n_experts, K = spec.top_k, T = static_cast<int64_t>(logits.size()) / E;
  SCOPED_TRACE(spec_name(spec) + " T=" + std::to_string(T) + (in_place ? " in place" : "") + ", seed " +
               std::to_string(run_seed()));
  std::vector<float> scores(T * E), weight(T * K);
  std::vector<int32_t> idx(T * K);
  cpu::router_forward(spec, logits.data(), bias.data(), T, scores.data(), idx.data(), weight.data());

  DeviceBuffer<float> d_logits(logits), d_bias(bias), d_scores(T * E), d_weight(T * K);
  DeviceBuffer<int32_t> d_idx(T * K);
  d_scores.poison();
  d_weight.poison();
  d_idx.poison();
  float* out_scores = in_place ? d_logits.get() : d_scores.get();
  cuda::router_forward(spec, d_logits.get(), d_bias.get(), T, out_scores, d_idx.get(), d_weight.get());
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> g_scores = in_place ? d_logits.download() : d_scores.download();
  const std::vector<int32_t> g_idx = d_idx.download();
  const std::vector<float> g_weight = d_weight.download();

  int64_t score_diff = 0, max_ulp = 0;
  for (int64_t i = 0; i < T * E; ++i) {
    const int64_t ulp = std::abs(int64_t{std::bit_cast<int32_t>(g_scores[i])} - std::bit_cast<int32_t>(scores[i]));
    score_diff += ulp != 0;
    max_ulp = std::max(max_ulp, ulp);
  }
  int64_t bad_tokens = 0;
  for (int64_t t = 0; t < T; ++t) {
    if (std::equal(idx.begin() + t * K, idx.begin() + (t + 1) * K, g_idx.begin() + t * K)) continue;
    if (++bad_tokens <= 3) {
      std::string cpu_s, gpu_s;
      for (int64_t k = 0; k < K; ++k) {
        cpu_s += " " + std::to_string(idx[t * K + k]);
        gpu_s += " " + std::to_string(g_idx[t * K + k]);
      }
      ADD_FAILURE() << "token " << t << ": CPU chose" << cpu_s << ", GPU chose" << gpu_s;
    }
  }
  double max_rel = 0;
  int64_t weight_same = 0;
  for (int64_t i = 0; i < T * K; ++i) {
    const double rel = std::abs(double{g_weight[i]} - weight[i]) / std::abs(double{weight[i]});
    max_rel = std::max(max_rel, std::isnan(rel) ? std::numeric_limits<double>::infinity() : rel);
    weight_same += std::bit_cast<uint32_t>(g_weight[i]) == std::bit_cast<uint32_t>(weight[i]);
  }
  std::printf("router_forward %s T=%lld%s: choice differs on %lld tokens; scores %lld differ (max %lld ulp, tol 1); "
              "weights max rel err %.3g (tol 1e-6), %lld/%lld bit-identical\n",
              spec_name(spec).c_str(), static_cast<long long>(T), in_place ? " in place" : "",
              static_cast<long long>(bad_tokens), static_cast<long long>(score_diff), static_cast<long long>(max_ulp),
              max_rel, static_cast<long long>(weight_same), static_cast<long long>(T * K));
  EXPECT_EQ(bad_tokens, 0);
  EXPECT_LE(max_ulp, 1);
  EXPECT_LE(max_rel, 1e-6);
}

TEST_F(MoeRoutingGpu, RouterChoosesTheCpuExpertsOnRandomLogits) {
  std::mt19937_64 rng(run_seed());
  struct Case {
    cpu::RouterSpec spec;
    int64_t tokens;
    bool in_place;
  };
  const Case cases[] = {
      {spec_of(64, 6, 8, 4), 4099, false},                 // the model's small config
      {spec_of(64, 6, 1, 1), 4099, false},                 // one group: no group ranking
      {spec_of(256, 8, 8, 4, true, 2.5f), 4099, true},     // DeepSeek-V3's, scores written over the logits
      {spec_of(160, 6, 8, 3, false, 16.0f), 1000, false},  // 20 experts a group, unnormalized
      {spec_of(8, 3, 8, 5), 1000, false},                  // one expert a group: group score = its top-1
      {spec_of(12, 12, 3, 3), 300, false},                 // K = E: everything chosen, in rank order
      {spec_of(1024, 8, 16, 4), 500, false},               // the GPU's largest E, 8 groups kept of 16
      {spec_of(96, 2, 96, 3), 500, false},                 // 96 groups of one, 3 lanes' worth per lane
  };
  int64_t moved = 0, total = 0;
  for (const Case& c : cases) {
    const int64_t E = c.spec.n_experts;
    std::vector<float> logits = normal_values(c.tokens * E, 2.0f, rng);
    // A bias of either sign, as auxiliary-loss-free balancing leaves it (negative ones are where the -inf mask
    // of excluded groups differs from HF's 0 mask).
    const std::vector<float> bias = normal_values(E, 0.3f, rng);
    moved += nudge_to_correctly_rounded_exp(logits);
    total += static_cast<int64_t>(logits.size());
    expect_router_matches_cpu(c.spec, logits, bias, c.in_place);
  }
  std::printf("router_forward: %lld of %lld logits nudged where glibc's expf is not correctly rounded\n",
              static_cast<long long>(moved), static_cast<long long>(total));
}

TEST_F(MoeRoutingGpu, RouterBreaksTiesTowardTheLowerIndexLikeTheCpu) {
  // Logits and biases from a few values: many experts and groups tie exactly, on both sides alike (the same
  // logit gives the same score), so only the tie rule decides. Then all-equal tokens: experts 0 .. K-1.
  std::mt19937_64 rng(run_seed() + 1);
  std::vector<float> logit_values = {-1.0f, 0.0f, 0.5f, 2.0f};
  nudge_to_correctly_rounded_exp(logit_values);  // still four values, so the ties stay
  const float bias_values[] = {0.0f, 0.25f, -0.25f};
  for (const cpu::RouterSpec& spec : {spec_of(64, 6, 8, 4), spec_of(64, 6, 1, 1), spec_of(256, 8, 8, 4)}) {
    const int64_t E = spec.n_experts, T = 2000;
    std::uniform_int_distribution<int> pick_logit(0, 3), pick_bias(0, 2);
    std::vector<float> logits(T * E), bias(E);
    for (float& x : logits) x = logit_values[pick_logit(rng)];
    for (float& b : bias) b = bias_values[pick_bias(rng)];
    expect_router_matches_cpu(spec, logits, bias, false);

    std::vector<float> flat(3 * E, 0.0f), zero(E, 0.0f);
    DeviceBuffer<float> d_logits(flat), d_bias(zero), d_scores(3 * E), d_weight(3 * spec.top_k);
    DeviceBuffer<int32_t> d_idx(3 * spec.top_k);
    cuda::router_forward(spec, d_logits.get(), d_bias.get(), 3, d_scores.get(), d_idx.get(), d_weight.get());
    const std::vector<int32_t> got = d_idx.download();
    for (int64_t t = 0; t < 3; ++t)
      for (int64_t k = 0; k < spec.top_k; ++k) EXPECT_EQ(got[t * spec.top_k + k], k) << spec_name(spec);
  }
}

TEST_F(MoeRoutingGpu, RouterNeverChoosesAnExpertOfAnExcludedGroup) {
  // All logits 0 (s = 0.5 exactly); the bias shapes b = 0.5 + bias. 4 groups of 2, 2 kept, K = 3:
  //   group 0: b = {1.4, 0.0}  score 1.4   <- holds the best expert, but excluded
  //   group 1: b = {0.8, 0.8}  score 1.6   kept
  //   group 2: b = {0.75, 0.75} score 1.5  kept
  //   group 3: b = {0.5, 0.5}  score 1.0
  // Choice: 2, 3 (tie: lower index first), then 4.
  const std::vector<float> bias = {0.9f, -0.5f, 0.3f, 0.3f, 0.25f, 0.25f, 0.0f, 0.0f};
  // And with negative biased scores inside the kept group (2 groups of 2, 1 kept, K = 2): group 0 b = {0.6, -0.4}
  // (score 0.2) beats group 1 b = {0.05, 0.05} (0.1); expert 1 (b < 0) is chosen over the excluded 2 and 3.
  const std::vector<float> bias2 = {0.1f, -0.9f, -0.45f, -0.45f};
  struct Case {
    cpu::RouterSpec spec;
    std::vector<float> bias;
    std::vector<int32_t> expected;
  };
  for (const Case& c : {Case{spec_of(8, 3, 4, 2), bias, {2, 3, 4}}, Case{spec_of(4, 2, 2, 1), bias2, {0, 1}}}) {
    const int64_t E = c.spec.n_experts, K = c.spec.top_k;
    DeviceBuffer<float> d_logits(std::vector<float>(E, 0.0f)), d_bias(c.bias), d_scores(E), d_weight(K);
    DeviceBuffer<int32_t> d_idx(K);
    d_idx.poison();
    cuda::router_forward(c.spec, d_logits.get(), d_bias.get(), 1, d_scores.get(), d_idx.get(), d_weight.get());
    EXPECT_EQ(d_idx.download(), c.expected) << spec_name(c.spec);
    std::vector<float> s(E), w(K);
    std::vector<int32_t> cpu_idx(K);
    cpu::router_forward(c.spec, std::vector<float>(E, 0.0f).data(), c.bias.data(), 1, s.data(), cpu_idx.data(),
                        w.data());
    EXPECT_EQ(cpu_idx, c.expected) << "the CPU reference disagrees with the hand-worked choice";
  }
}

TEST_F(MoeRoutingGpu, RouterWeightsAndBackwardMatchTheCpu) {
  std::mt19937_64 rng(run_seed() + 2);
  const int64_t T = 3001;
  for (bool norm : {true, false}) {
    const cpu::RouterSpec spec = spec_of(64, 6, 8, 4, norm, 2.5f);
    const int64_t E = spec.n_experts, K = spec.top_k;
    std::vector<float> logits = normal_values(T * E, 2.0f, rng), bias(E, 0.0f);
    std::vector<float> scores(T * E), weight(T * K);
    std::vector<int32_t> idx(T * K);
    cpu::router_forward(spec, logits.data(), bias.data(), T, scores.data(), idx.data(), weight.data());
    const std::vector<float> dweight = normal_values(T * K, 1.0f, rng), dscores = normal_values(T * E, 0.1f, rng);
    DeviceBuffer<float> d_scores(scores), d_dweight(dweight), d_weight(T * K), d_dlogits(T * E);
    DeviceBuffer<int32_t> d_idx(idx);

    // Weights: the same operations on the same scores; the same 1e-6 as router_forward's weights.
    d_weight.poison();
    cuda::router_weights(spec, d_scores.get(), d_idx.get(), T, d_weight.get());
    const std::vector<float> g_weight = d_weight.download();
    double max_rel = 0;
    for (int64_t i = 0; i < T * K; ++i)
      max_rel = std::max(max_rel, std::abs(double{g_weight[i]} - weight[i]) / std::abs(double{weight[i]}));
    std::printf("router_weights %s: max rel err %.3g (tol 1e-6)\n", spec_name(spec).c_str(), max_rel);
    EXPECT_LE(max_rel, 1e-6) << spec_name(spec);

    // Backward, with and without dscores, and with dscores in the dlogits buffer. The CPU's operations in its
    // order (expected bit-identical); the tolerance, 1e-6 of the token row's largest |dlogit|, leaves room only
    // for a host compiler that fuses a multiply-add the GPU rounds twice.
    for (int mode = 0; mode < 3; ++mode) {
      std::vector<float> dlogits(T * E);
      cpu::router_backward(spec, scores.data(), idx.data(), dweight.data(), mode ? dscores.data() : nullptr, T,
                           dlogits.data());
      DeviceBuffer<float> d_dscores(dscores);
      float* out = mode == 2 ? d_dscores.get() : d_dlogits.get();
      if (mode != 2) d_dlogits.poison();
      cuda::router_backward(spec, d_scores.get(), d_idx.get(), d_dweight.get(), mode ? d_dscores.get() : nullptr, T,
                            out);
      const std::vector<float> got = mode == 2 ? d_dscores.download() : d_dlogits.download();
      double worst = 0;  // |error| / tolerance
      int64_t same = 0;
      for (int64_t t = 0; t < T; ++t) {
        float row_max = 0;
        for (int64_t e = 0; e < E; ++e) row_max = std::max(row_max, std::abs(dlogits[t * E + e]));
        for (int64_t e = 0; e < E; ++e) {
          const int64_t i = t * E + e;
          const double err = std::abs(double{got[i]} - dlogits[i]);
          worst = std::max(worst, std::isnan(err) ? 1e30 : err / (1e-6 * row_max + 1e-30));
          same += std::bit_cast<uint32_t>(got[i]) == std::bit_cast<uint32_t>(dlogits[i]);
        }
      }
      std::printf("router_backward %s %s: worst err / tol %.3g (tol 1e-6 of the row max), %lld/%lld bit-identical\n",
                  spec_name(spec).c_str(), mode == 0 ? "no dscores" : mode == 1 ? "dscores" : "dscores in place",
                  worst, static_cast<long long>(same), static_cast<long long>(T * E));
      EXPECT_LE(worst, 1.0) << spec_name(spec) << " mode " << mode;
    }
  }
}

TEST_F(MoeRoutingGpu, BalanceLossAndItsGradientMatchTheCpu) {
  std::mt19937_64 rng(run_seed() + 3);
  const cpu::RouterSpec spec = spec_of(64, 6, 8, 4);
  const int64_t E = 64, K = 6, batch = 3, seq = 1000, T = batch * seq;  // 1000 = 15 full chunks of 64 and 40
  const float alpha = 0.003f;
  std::vector<float> logits = normal_values(T * E, 2.0f, rng), bias = normal_values(E, 0.3f, rng);
  std::vector<float> scores(T * E), weight(T * K);
  std::vector<int32_t> idx(T * K);
  cpu::router_forward(spec, logits.data(), bias.data(), T, scores.data(), idx.data(), weight.data());
  const std::vector<float> ds0 = normal_values(T * E, 1e-3f, rng);
  std::vector<float> ds = ds0;
  const float loss = cpu::router_balance_loss(spec, scores.data(), idx.data(), batch, seq, alpha, ds.data());

  DeviceBuffer<float> d_scores(scores), d_ds(ds0);
  DeviceBuffer<int32_t> d_idx(idx);
  const float g_loss = cuda::router_balance_loss(spec, d_scores.get(), d_idx.get(), batch, seq, alpha, d_ds.get());
  const std::vector<float> g_ds = d_ds.download();
  // Both sides sum in double and differ only in the order of additions (~1e-15 relative), then round to float
  // once: at most 1 ulp apart, 2^-23 = 1.2e-7 relative; 1e-6 leaves margin.
  const double loss_rel = std::abs(double{g_loss} - loss) / std::abs(double{loss});
  // Gradient: each side rounds its double term to float (1 ulp of |term|) and adds it to ds0 (1 ulp of the sum),
  // 2^-22 · (|ds0| + |term|); the double term itself may cancel (c_e - mean c), where the order of additions
  // shows up at ~1e-15 of the largest term: covered by 1e-9 · max |term|.
  double max_term = 0;
  for (int64_t i = 0; i < T * E; ++i) max_term = std::max(max_term, std::abs(double{ds[i]} - ds0[i]));
  double worst = 0;
  for (int64_t i = 0; i < T * E; ++i) {
    const double tol = 0x1.0p-22 * (std::abs(ds0[i]) + std::abs(double{ds[i]} - ds0[i])) + 1e-9 * max_term;
    const double err = std::abs(double{g_ds[i]} - ds[i]);
    worst = std::max(worst, std::isnan(err) ? 1e30 : err / tol);
  }
  std::printf("router_balance_loss batch %lld x seq %lld: loss %.8g vs CPU %.8g, rel err %.3g (tol 1e-6); "
              "gradient worst err / tol %.3g\n",
              static_cast<long long>(batch), static_cast<long long>(seq), g_loss, loss, loss_rel, worst);
  EXPECT_LE(loss_rel, 1e-6);
  EXPECT_LE(worst, 1.0);
  // Without a gradient buffer, and the same loss again (fixed reduction order: run to run identical).
  EXPECT_EQ(cuda::router_balance_loss(spec, d_scores.get(), d_idx.get(), batch, seq, alpha, nullptr), g_loss);
}

TEST_F(MoeRoutingGpu, RouterRefusesSpecsTheGpuCannotRun) {
  float* none = nullptr;
  EXPECT_THROW(cuda::router_forward(spec_of(2048, 8, 8, 4), none, none, 1, none, nullptr, none), Error);
  EXPECT_THROW(cuda::router_forward(spec_of(64, 33, 8, 4), none, none, 1, none, nullptr, none), Error);  // K > 32 kept
  EXPECT_THROW(cuda::router_forward(spec_of(64, 6, 7, 4), none, none, 1, none, nullptr, none), Error);   // 7 ∤ 64
  EXPECT_THROW(cuda::router_forward(spec_of(64, 6, 8, 4), none, none, 1, none, nullptr, none), Error);   // null
  EXPECT_NO_THROW(cuda::router_forward(spec_of(64, 6, 8, 4), none, none, 0, none, nullptr, none));       // empty
  EXPECT_THROW(cuda::router_balance_loss(spec_of(64, 6, 8, 4), none, nullptr, 2, 0, 0.1f, none), Error);
}

TEST_F(MoeRoutingGpu, ReportsRouterTiming) {
  const int64_t T = 16384, E = 64, K = 6;
  std::mt19937_64 rng(run_seed() + 4);
  DeviceBuffer<float> d_logits(normal_values(T * E, 2.0f, rng)), d_bias(normal_values(E, 0.3f, rng));
  DeviceBuffer<float> d_scores(T * E), d_weight(T * K);
  DeviceBuffer<int32_t> d_idx(T * K);
  for (const cpu::RouterSpec& spec : {spec_of(E, K, 8, 4), spec_of(E, K, 1, 1)}) {
    const double ms = median_ms([&] {
      cuda::router_forward(spec, d_logits.get(), d_bias.get(), T, d_scores.get(), d_idx.get(), d_weight.get());
    });
    const double bytes = 4.0 * (2 * T * E + 2 * T * K);  // logits in, scores, indices and weights out
    std::printf("router_forward %s T=%lld: %.1f us, %.0f GB/s\n", spec_name(spec).c_str(), static_cast<long long>(T),
                ms * 1e3, bytes / (ms * 1e-3) / 1e9);
  }
}

}  // namespace
}  // namespace moerl
