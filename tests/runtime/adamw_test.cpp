#include "runtime/optim/adamw.hpp"

#include <gtest/gtest.h>
#include <omp.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <random>

#include "kernels/half.hpp"
#include "runtime/error.hpp"

namespace moerl {
namespace {

void set(Tensor& t, std::initializer_list<float> values) {
  ASSERT_EQ(static_cast<int64_t>(values.size()), t.numel());
  std::copy(values.begin(), values.end(), t.data<float>());
}

std::vector<float> values_of(const Tensor& t) { return {t.data<float>(), t.data<float>() + t.numel()}; }

// The stored BF16 moment i as a float.
float moment(const AdamW& opt, const std::string& key, int64_t i) {
  return float_from_bf16(opt.state().at(key)->u16()[i]);
}

// One AdamW update of one element in double, the textbook way (Loshchilov & Hutter; PyTorch's AdamW), with
// the moments rounded to BF16 after each update as the DeepSeek-V3 recipe stores them.
struct RefElement {
  double p, m = 0, v = 0;
  void step(double g, double lr, int t, double b1, double b2, double eps, double wd) {
    m = round_bf16(static_cast<float>(b1 * m + (1 - b1) * g));
    v = round_bf16(static_cast<float>(b2 * v + (1 - b2) * g * g));
    const double m_hat = m / (1 - std::pow(b1, t)), v_hat = v / (1 - std::pow(b2, t));
    p = p * (1 - lr * wd) - lr * m_hat / (std::sqrt(v_hat) + eps);
  }
};

TEST(AdamW, TwoStepsMatchAHandComputedUpdateWithBf16Moments) {
  Params params;
  Param& w = params.add("w", {2, 2});
  Param& b = params.add("b", {2});
  set(w.value, {1.0f, -2.0f, 0.5f, 3.0f});
  set(b.value, {0.5f, -0.5f});
  AdamWConfig cfg;
  cfg.lr = 0.01;
  cfg.weight_decay = 0.1;
  cfg.clip_grad_norm = 0;  // off: this test is about the update
  cfg.total_steps = 1000000;  // cosine barely moves: lr(1) = lr * (1 - 2.5e-12)
  AdamW opt(params, cfg);

  std::vector<RefElement> ref;
  for (float x : values_of(w.value)) ref.push_back({x});
  for (float x : values_of(b.value)) ref.push_back({x});
  const float grads[2][6] = {{0.1f, -0.2f, 0.3f, 0.05f, 1e-3f, -4.0f}, {-0.3f, 0.1f, 0.3f, 0.0f, 2.0f, 1.0f}};
  for (int s = 0; s < 2; ++s) {
    set(w.grad, {grads[s][0], grads[s][1], grads[s][2], grads[s][3]});
    set(b.grad, {grads[s][4], grads[s][5]});
    const StepStats st = opt.step(s);
    EXPECT_FALSE(st.skipped);
    for (size_t i = 0; i < ref.size(); ++i)
      ref[i].step(grads[s][i], st.lr, s + 1, cfg.beta1, cfg.beta2, cfg.eps, i < 4 ? cfg.weight_decay : 0.0);
  }
  EXPECT_EQ(opt.steps_taken(), 2);
  // FP32 arithmetic of a handful of operations on values of order 1: a few ulps of 1, about 1e-6.
  for (size_t i = 0; i < 6; ++i) {
    const float got = i < 4 ? w.value.data<float>()[i] : b.value.data<float>()[i - 4];
    EXPECT_NEAR(got, ref[i].p, 1e-6) << "element " << i;
    const std::string name = i < 4 ? "w" : "b";
    const int64_t j = static_cast<int64_t>(i < 4 ? i : i - 4);
    EXPECT_EQ(moment(opt, "optimizer.exp_avg." + name, j), static_cast<float>(ref[i].m)) << "element " << i;
    EXPECT_EQ(moment(opt, "optimizer.exp_avg_sq." + name, j), static_cast<float>(ref[i].v)) << "element " << i;
  }
}

TEST(AdamW, LearningRateWarmsUpLinearlyThenDecaysAlongACosine) {
  AdamWConfig cfg;
  cfg.lr = 1.0;
  cfg.warmup_steps = 10;
  cfg.total_steps = 110;
  cfg.min_lr_ratio = 0.1;
  // Exact in double up to the cosine's last bit.
  EXPECT_DOUBLE_EQ(learning_rate(cfg, 0), 0.1);
  EXPECT_DOUBLE_EQ(learning_rate(cfg, 4), 0.5);
  EXPECT_DOUBLE_EQ(learning_rate(cfg, 9), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate(cfg, 10), 1.0);
  EXPECT_NEAR(learning_rate(cfg, 60), 0.55, 1e-15);  // halfway: min + (max - min) / 2
  EXPECT_NEAR(learning_rate(cfg, 35), 0.1 + 0.9 * 0.5 * (1 + std::cos(M_PI / 4)), 1e-15);
  EXPECT_DOUBLE_EQ(learning_rate(cfg, 110), 0.1);
  EXPECT_DOUBLE_EQ(learning_rate(cfg, 5000), 0.1);
  for (int64_t s = 10; s < 110; ++s) EXPECT_GT(learning_rate(cfg, s), learning_rate(cfg, s + 1)) << s;
  cfg.warmup_steps = 0;
  EXPECT_DOUBLE_EQ(learning_rate(cfg, 0), 1.0);
  EXPECT_THROW(learning_rate(cfg, -1), Error);
}

TEST(AdamW, ClippingScalesTheGlobalNormToTheLimit) {
  Params params;
  Param& a = params.add("a", {2, 2});
  Param& b = params.add("b", {1});
  Param& frozen = params.add("frozen", {2}, /*trainable=*/false);
  set(a.grad, {3.0f, 0.0f, -4.0f, 0.0f});
  set(b.grad, {12.0f});
  set(frozen.grad, {1000.0f, 1000.0f});  // not trainable: neither counted nor scaled
  EXPECT_DOUBLE_EQ(grad_norm(params), 13.0);
  EXPECT_DOUBLE_EQ(clip_grad_norm(params, 1.0), 13.0);
  // Each element is one FP32 product: relative error 2^-24 per element, so ~1e-7 on the norm.
  EXPECT_NEAR(grad_norm(params), 1.0, 1e-6);
  EXPECT_FLOAT_EQ(a.grad.data<float>()[0], 3.0f / 13);
  EXPECT_FLOAT_EQ(a.grad.data<float>()[2], -4.0f / 13);
  EXPECT_FLOAT_EQ(b.grad.data<float>()[0], 12.0f / 13);
  EXPECT_EQ(frozen.grad.data<float>()[0], 1000.0f);
  // Under the limit nothing changes, to the bit.
  const std::vector<float> before = values_of(a.grad);
  EXPECT_NEAR(clip_grad_norm(params, 2.0), 1.0, 1e-6);
  EXPECT_EQ(values_of(a.grad), before);

  AdamWConfig cfg;
  cfg.clip_grad_norm = 0.5;
  AdamW opt(params, cfg);
  set(b.grad, {12.0f});
  EXPECT_NEAR(opt.step(0).grad_norm, std::sqrt(1.0 / 169 * 25 + 144), 1e-6);  // reported before clipping
  EXPECT_NEAR(grad_norm(params), 0.5, 1e-6);
}

TEST(AdamW, GradientNormIsIdenticalForAnyNumberOfThreads) {
  Params params;
  Param& big = params.add("big", {1000, 301});  // 19 norm blocks, the last one partial
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  for (float& g : big.grad.span<float>()) g = normal(rng);
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const double one = grad_norm(params);
  omp_set_num_threads(2);
  const double two = grad_norm(params);
  omp_set_num_threads(threads);
  EXPECT_EQ(one, two);
  long double naive = 0;
  for (float g : big.grad.span<float>()) naive += static_cast<long double>(g) * g;
  // Double sums of 3e5 terms of ~1: relative error ~1e-16 * log-ish growth, far below 1e-12.
  EXPECT_NEAR(one, std::sqrt(static_cast<double>(naive)), 1e-12 * one);
}

TEST(AdamW, DecaysMatricesButNotVectorsAndSkipsFrozenParameters) {
  Params params;
  Param& w = params.add("w", {2, 2});
  Param& norm = params.add("norm", {2});
  Param& frozen = params.add("frozen", {2, 2}, /*trainable=*/false);
  set(w.value, {1.0f, 2.0f, -3.0f, 4.0f});
  set(norm.value, {1.0f, 1.0f});
  set(frozen.value, {1.0f, 1.0f, 1.0f, 1.0f});
  set(frozen.grad, {5.0f, 5.0f, 5.0f, 5.0f});
  AdamWConfig cfg;
  cfg.lr = 0.1;
  cfg.weight_decay = 0.5;
  cfg.warmup_steps = 0;
  AdamW opt(params, cfg);
  EXPECT_EQ(opt.state().count("optimizer.exp_avg.frozen"), 0u);
  opt.step(0);  // zero gradients: only the decay acts
  const float decay = static_cast<float>(1.0 - 0.1 * 0.5);
  EXPECT_EQ(values_of(w.value), (std::vector<float>{decay, 2 * decay, -3 * decay, 4 * decay}));
  EXPECT_EQ(values_of(norm.value), (std::vector<float>{1.0f, 1.0f}));
  EXPECT_EQ(values_of(frozen.value), (std::vector<float>{1.0f, 1.0f, 1.0f, 1.0f}));
}

TEST(AdamW, SkipsAStepWhoseGradientIsNotFinite) {
  Params params;
  Param& w = params.add("w", {2, 2});
  set(w.value, {1.0f, 2.0f, 3.0f, 4.0f});
  set(w.grad, {0.1f, NAN, 0.1f, 0.1f});
  AdamW opt(params, AdamWConfig{});
  const StepStats st = opt.step(0);
  EXPECT_TRUE(st.skipped);
  EXPECT_TRUE(std::isnan(st.grad_norm));
  EXPECT_EQ(values_of(w.value), (std::vector<float>{1.0f, 2.0f, 3.0f, 4.0f}));
  EXPECT_EQ(opt.steps_taken(), 0);
  EXPECT_EQ(moment(opt, "optimizer.exp_avg.w", 0), 0.0f);
}

TEST(AdamW, RefusesConfigurationsOutOfRange) {
  Params params;
  AdamWConfig cfg;
  cfg.beta1 = 1.0;
  try {
    AdamW opt(params, cfg);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("beta1"), std::string::npos) << e.what();
  }
  cfg = AdamWConfig{};
  cfg.total_steps = 0;
  EXPECT_THROW(AdamW(params, cfg), Error);
}

// A small model: a matrix, a vector and a frozen buffer; the loss is a fixed quadratic plus a wiggle, so
// gradients depend on the weights (as in training) and clipping triggers on early steps.
void make_model(Params& params) {
  params.add("layer.weight", {3, 5});
  params.add("layer.norm", {5});
  params.add("buffer", {2}, /*trainable=*/false);
  int k = 0;
  for (auto& [name, p] : params.all())
    for (float& x : p.value.span<float>()) x = 0.1f * static_cast<float>(k++ % 7) - 0.3f;
}

void compute_grads(Params& params, int64_t step) {
  for (auto& [name, p] : params.all()) {
    const float* x = p.value.data<float>();
    float* g = p.grad.data<float>();
    for (int64_t i = 0; i < p.value.numel(); ++i)
      g[i] = 2.0f * (x[i] - 1.0f) + 0.05f * std::sin(static_cast<float>(step * 13 + i));
  }
}

TEST(AdamW, ContinuesBitIdenticallyAfterSavingAndRestoringItsState) {
  AdamWConfig cfg;
  cfg.lr = 0.05;
  cfg.warmup_steps = 2;
  cfg.total_steps = 5;
  cfg.clip_grad_norm = 1.0;

  Params straight;
  make_model(straight);
  AdamW opt(straight, cfg);
  int clipped = 0;
  for (int64_t s = 0; s < 5; ++s) {
    compute_grads(straight, s);
    clipped += opt.step(s).grad_norm > cfg.clip_grad_norm;
  }
  EXPECT_GT(clipped, 0);  // the clipped path is part of what must resume exactly

  const std::filesystem::path dir =
      std::filesystem::path(::testing::TempDir()) / ("moerl_adamw_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  {
    Params first;
    make_model(first);
    AdamW opt1(first, cfg);
    for (int64_t s = 0; s < 2; ++s) {
      compute_grads(first, s);
      opt1.step(s);
    }
    std::map<std::string, const Tensor*> all = opt1.state();
    for (const auto& [name, p] : first.all()) all[name] = &p.value;
    write_safetensors(dir / "ckpt.safetensors", all);
  }
  const SafeTensors saved = read_safetensors(dir / "ckpt.safetensors");
  std::filesystem::remove_all(dir);
  Params resumed;
  make_model(resumed);
  for (auto& [name, p] : resumed.all()) std::memcpy(p.value.bytes(), saved.at(name).bytes(), p.value.nbytes());
  AdamW opt2(resumed, cfg);
  opt2.load_state(saved);
  EXPECT_EQ(opt2.steps_taken(), 2);
  for (int64_t s = 2; s < 5; ++s) {
    compute_grads(resumed, s);
    opt2.step(s);
  }
  for (const auto& [name, p] : straight.all()) {
    const Tensor& q = resumed.at(name).value;
    EXPECT_EQ(std::memcmp(p.value.bytes(), q.bytes(), p.value.nbytes()), 0) << name;
  }
  const auto a = opt.state(), b = opt2.state();
  for (const auto& [key, t] : a) EXPECT_EQ(std::memcmp(t->bytes(), b.at(key)->bytes(), t->nbytes()), 0) << key;
}

TEST(AdamW, RefusesAStateThatDoesNotFitTheModel) {
  Params params;
  make_model(params);
  AdamW opt(params, AdamWConfig{});
  compute_grads(params, 0);
  opt.step(0);

  SafeTensors missing;
  missing.source = "opt.safetensors";
  for (const auto& [key, t] : opt.state())
    if (key != "optimizer.exp_avg_sq.layer.norm") missing.tensors.emplace(key, t->clone());
  AdamW other(params, AdamWConfig{});
  try {
    other.load_state(missing);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("opt.safetensors: optimizer state has no optimizer.exp_avg_sq.layer.norm"),
              std::string::npos) << e.what();
  }
  EXPECT_EQ(other.steps_taken(), 0);  // nothing was half-loaded

  SafeTensors reshaped;
  reshaped.source = "opt.safetensors";
  for (const auto& [key, t] : opt.state()) reshaped.tensors.emplace(key, t->clone());
  reshaped.tensors.at("optimizer.exp_avg.layer.weight") = Tensor({5, 3}, DType::BF16);
  EXPECT_THROW(other.load_state(reshaped), Error);

  SafeTensors extra;
  extra.source = "opt.safetensors";
  for (const auto& [key, t] : opt.state()) extra.tensors.emplace(key, t->clone());
  extra.tensors.emplace("optimizer.exp_avg.buffer", Tensor({2}, DType::BF16));  // a frozen parameter
  EXPECT_THROW(other.load_state(extra), Error);
}

TEST(AdamW, MinimisesAnIllConditionedQuadratic) {
  // f(x) = 1/2 sum a_i (x_i - c_i)^2 with curvatures a_i from 0.01 to 100: Adam's per-coordinate scaling
  // makes all coordinates converge at the same rate.
  Params params;
  Param& x = params.add("x", {4, 8});
  std::vector<float> a(32), c(32);
  for (int i = 0; i < 32; ++i) {
    a[static_cast<size_t>(i)] = std::pow(10.0f, -2.0f + 4.0f * static_cast<float>(i) / 31);
    c[static_cast<size_t>(i)] = std::sin(static_cast<float>(i)) * 2.0f;
  }
  AdamWConfig cfg;
  cfg.lr = 0.1;
  cfg.weight_decay = 0;  // decay would pull the minimum towards 0
  cfg.clip_grad_norm = 0;
  cfg.warmup_steps = 10;
  cfg.total_steps = 400;
  cfg.min_lr_ratio = 0.001;
  float* v = x.value.data<float>();
  float* g = x.grad.data<float>();
  AdamW opt(params, cfg);
  for (int64_t s = 0; s < 400; ++s) {
    for (size_t i = 0; i < 32; ++i) g[i] = a[i] * (v[i] - c[i]);
    opt.step(s);
  }
  // Near the optimum Adam steps are at most ~lr whatever the curvature, and the final lr is 1e-4: a converged
  // run ends within ~1e-4 (measured: 3e-6 at worst), one that stalled far from it does not.
  for (size_t i = 0; i < 32; ++i) EXPECT_NEAR(v[i], c[i], 1e-4) << "coordinate " << i << " curvature " << a[i];
}

}  // namespace
}  // namespace moerl
