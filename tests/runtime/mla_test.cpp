#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "runtime/error.hpp"
#include "runtime/model/attention.hpp"
#include "tests/support/gradcheck.hpp"

namespace moerl {
namespace {

const std::string kPrefix = "model.layers.0.self_attn.";

ModelConfig small_config(int64_t q_lora, bool interleave) {
  ModelConfig c;
  c.hidden_size = 16;
  c.num_attention_heads = 2;
  c.q_lora_rank = q_lora;
  c.kv_lora_rank = 6;
  c.qk_nope_head_dim = 4;
  c.qk_rope_head_dim = 4;
  c.v_head_dim = 3;
  c.rope_interleave = interleave;
  c.rope_theta = 100.0;  // both rope pairs turn noticeably within a few positions
  return c;
}

std::vector<float> random_vector(size_t n, uint32_t seed, float mean = 0.0f, float stddev = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(mean, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// Matrices N(0, gain²/fan_in), so activations stay O(1); norm weights 1 ± 0.2. Query weights get gain 2 so
// the softmax is far from uniform.
void randomize(Params& params, uint32_t seed) {
  for (auto& [name, p] : params.all()) {
    const Shape& s = p.value.shape();
    std::vector<float> v;
    if (s.size() == 1) {
      v = random_vector(s[0], seed++, 1.0f, 0.2f);
    } else {
      const float gain = name.find("q_") != std::string::npos ? 2.0f : 1.0f;
      v = random_vector(s[0] * s[1], seed++, 0.0f, gain / std::sqrt(float(s[1])));
    }
    std::copy(v.begin(), v.end(), p.value.data<float>());
  }
}

// ---- A naive double-precision MLA written the way HF DeepseekV3Attention computes it. ----

using Mat = std::vector<double>;  // row-major

Mat weight(const Params& params, const std::string& name) {
  const Param& p = params.at(kPrefix + name);
  return Mat(p.value.data<float>(), p.value.data<float>() + p.value.numel());
}

// y[T, out] = x[T, in] · W[out, in]ᵀ
Mat linear(const Mat& x, const Mat& w, int64_t T, int64_t out, int64_t in) {
  Mat y(T * out, 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t o = 0; o < out; ++o)
      for (int64_t i = 0; i < in; ++i) y[t * out + o] += x[t * in + i] * w[o * in + i];
  return y;
}

Mat rmsnorm(const Mat& x, const Mat& w, int64_t T, int64_t d, double eps) {
  Mat y(x.size());
  for (int64_t t = 0; t < T; ++t) {
    double ss = 0;
    for (int64_t j = 0; j < d; ++j) ss += x[t * d + j] * x[t * d + j];
    const double r = 1.0 / std::sqrt(ss / d + eps);
    for (int64_t j = 0; j < d; ++j) y[t * d + j] = w[j] * x[t * d + j] * r;
  }
  return y;
}

// HF: (de-interleave when rope_interleave), then x·cos + rotate_half(x)·sin with cos/sin = cat(freqs, freqs).
std::vector<double> hf_rope(std::vector<double> x, int64_t pos, double theta, bool interleave) {
  const int64_t d = static_cast<int64_t>(x.size()), half = d / 2;
  if (interleave) {
    std::vector<double> de(d);
    for (int64_t i = 0; i < half; ++i) de[i] = x[2 * i], de[i + half] = x[2 * i + 1];
    x = de;
  }
  std::vector<double> y(d);
  for (int64_t i = 0; i < d; ++i) {
    const double angle = pos / std::pow(theta, double(2 * (i % half)) / d);
    const double rot = i < half ? -x[i + half] : x[i - half];
    y[i] = x[i] * std::cos(angle) + rot * std::sin(angle);
  }
  return y;
}

Mat reference_mla(const ModelConfig& c, const Params& params, const std::vector<float>& xf, int64_t batch,
                  int64_t seq) {
  const int64_t T = batch * seq, H = c.num_attention_heads, dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim;
  const int64_t dv = c.v_head_dim, dq = dn + dr, D = c.hidden_size, kvl = c.kv_lora_rank;
  const Mat x(xf.begin(), xf.end());
  Mat q;
  if (c.q_lora_rank > 0) {
    Mat qa = linear(x, weight(params, "q_a_proj.weight"), T, c.q_lora_rank, D);
    qa = rmsnorm(qa, weight(params, "q_a_layernorm.weight"), T, c.q_lora_rank, c.rms_norm_eps);
    q = linear(qa, weight(params, "q_b_proj.weight"), T, H * dq, c.q_lora_rank);
  } else {
    q = linear(x, weight(params, "q_proj.weight"), T, H * dq, D);
  }
  const Mat ckv = linear(x, weight(params, "kv_a_proj_with_mqa.weight"), T, kvl + dr, D);
  Mat cpart(T * kvl);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < kvl; ++j) cpart[t * kvl + j] = ckv[t * (kvl + dr) + j];
  const Mat kv = linear(rmsnorm(cpart, weight(params, "kv_a_layernorm.weight"), T, kvl, c.rms_norm_eps),
                        weight(params, "kv_b_proj.weight"), T, H * (dn + dv), kvl);
  // query/key [T][H] = [nope | roped rope part in HF's order]
  std::vector<std::vector<std::vector<double>>> query(T, std::vector<std::vector<double>>(H));
  auto key = query;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t pos = t % seq;
    const std::vector<double> kr(ckv.begin() + t * (kvl + dr) + kvl, ckv.begin() + (t + 1) * (kvl + dr));
    const auto kr_roped = hf_rope(kr, pos, c.rope_theta, c.rope_interleave);
    for (int64_t h = 0; h < H; ++h) {
      const double* qh = q.data() + (t * H + h) * dq;
      const double* kvh = kv.data() + (t * H + h) * (dn + dv);
      const auto qr = hf_rope(std::vector<double>(qh + dn, qh + dq), pos, c.rope_theta, c.rope_interleave);
      query[t][h].assign(qh, qh + dn);
      query[t][h].insert(query[t][h].end(), qr.begin(), qr.end());
      key[t][h].assign(kvh, kvh + dn);
      key[t][h].insert(key[t][h].end(), kr_roped.begin(), kr_roped.end());
    }
  }
  Mat attn(T * H * dv, 0.0);
  const double scale = 1.0 / std::sqrt(double(dq));
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < seq; ++i) {
        const int64_t ti = b * seq + i;
        std::vector<double> s(i + 1);
        double m = -INFINITY, sum = 0;
        for (int64_t j = 0; j <= i; ++j) {
          s[j] = 0;
          for (int64_t e = 0; e < dq; ++e) s[j] += query[ti][h][e] * key[b * seq + j][h][e];
          s[j] *= scale;
          m = std::max(m, s[j]);
        }
        for (int64_t j = 0; j <= i; ++j) sum += s[j] = std::exp(s[j] - m);
        for (int64_t j = 0; j <= i; ++j)
          for (int64_t e = 0; e < dv; ++e)
            attn[(ti * H + h) * dv + e] += s[j] / sum * kv[((b * seq + j) * H + h) * (dn + dv) + dn + e];
      }
  return linear(attn, weight(params, "o_proj.weight"), T, D, H * dv);
}

// ---- Tests ----

TEST(MlaAttention, RegistersTheDeepSeekTensorNamesAndShapes) {
  Params with, without;
  MlaAttention a(small_config(8, true), with, "model.layers.0.self_attn");  // no trailing dot: one is added
  MlaAttention b(small_config(0, true), without, kPrefix);
  EXPECT_EQ(with.at(kPrefix + "q_a_proj.weight").value.shape(), (Shape{8, 16}));
  EXPECT_EQ(with.at(kPrefix + "q_a_layernorm.weight").value.shape(), (Shape{8}));
  EXPECT_EQ(with.at(kPrefix + "q_b_proj.weight").value.shape(), (Shape{2 * 8, 8}));
  EXPECT_EQ(with.at(kPrefix + "kv_a_proj_with_mqa.weight").value.shape(), (Shape{6 + 4, 16}));
  EXPECT_EQ(with.at(kPrefix + "kv_a_layernorm.weight").value.shape(), (Shape{6}));
  EXPECT_EQ(with.at(kPrefix + "kv_b_proj.weight").value.shape(), (Shape{2 * (4 + 3), 6}));
  EXPECT_EQ(with.at(kPrefix + "o_proj.weight").value.shape(), (Shape{16, 2 * 3}));
  EXPECT_FALSE(with.contains(kPrefix + "q_proj.weight"));
  EXPECT_EQ(with.all().size(), 7u);
  EXPECT_EQ(without.at(kPrefix + "q_proj.weight").value.shape(), (Shape{2 * 8, 16}));
  EXPECT_FALSE(without.contains(kPrefix + "q_a_proj.weight"));
  EXPECT_EQ(without.all().size(), 5u);
}

TEST(MlaAttention, RefusesAnOddRopeDimension) {
  ModelConfig c = small_config(0, true);
  c.qk_rope_head_dim = 5;
  Params params;
  EXPECT_THROW(MlaAttention(c, params, kPrefix), Error);
}

TEST(MlaAttention, RefusesBackwardWithoutForward) {
  Params params;
  MlaAttention a(small_config(0, true), params, kPrefix);
  std::vector<float> dy(16), dx(16);
  EXPECT_THROW(a.backward(dy.data(), dx.data()), Error);
}

void expect_forward_matches_hf_formulation(int64_t q_lora, bool interleave) {
  const ModelConfig c = small_config(q_lora, interleave);
  Params params;
  MlaAttention attn(c, params, kPrefix);
  randomize(params, 100);
  const int64_t batch = 2, seq = 7, T = batch * seq;
  const auto x = random_vector(T * c.hidden_size, 7);
  std::vector<float> y(x.size());
  attn.forward(x.data(), batch, seq, y.data(), Precision::FP32);
  const Mat want = reference_mla(c, params, x, batch, seq);
  // A chain of five FP32 GEMMs with K ≤ 16, two norms and a softmax on O(1) values: relative rounding ~1e-6.
  for (size_t i = 0; i < y.size(); ++i) EXPECT_NEAR(y[i], want[i], 1e-5) << "element " << i;
}

TEST(MlaAttention, ForwardMatchesHfFormulationWithQueryLoraAndInterleavedRope) {
  expect_forward_matches_hf_formulation(8, true);
}

TEST(MlaAttention, ForwardMatchesHfFormulationWithQProjAndRotateHalfRope) {
  expect_forward_matches_hf_formulation(0, false);
}

void expect_gradients_match_finite_differences(int64_t q_lora, bool interleave) {
  const ModelConfig c = small_config(q_lora, interleave);
  Params params;
  MlaAttention attn(c, params, kPrefix);
  randomize(params, 200);
  const int64_t batch = 2, seq = 5, T = batch * seq, n = T * c.hidden_size;
  auto x = random_vector(n, 11);
  const auto g = random_vector(n, 12);
  std::vector<float> y(n), dx(n, 123.0f);  // dx must be overwritten, not accumulated
  auto loss = [&] {
    attn.forward(x.data(), batch, seq, y.data(), Precision::FP32);
    return test::dot_double(y.data(), g.data(), n);
  };
  params.zero_grad();
  loss();
  attn.backward(g.data(), dx.data());
  // The FP32 forward leaves ~1e-6 of rounding noise in the loss, ~1e-6 / 2h in the estimate; the norms over 6
  // and 8 channels are strongly curved, so plain central differences need h small enough to drown in that
  // noise (h = 1e-2: 1.6e-3 off in kv_a_proj_with_mqa). Richardson extrapolation at h = 2e-2 cancels the h²
  // term: measured worst errors 1.5e-4 (kv_a_proj_with_mqa, |grad| 0.38), ≤ 8e-5 elsewhere, 1e-5 for the
  // linear o_proj. atol 2e-4, rtol 1e-3 keep a factor ≥ 2 over the worst ratio seen; a wrong formula is off by
  // O(|gradient|) ~ 0.1.
  const test::GradCheckOptions opt{.step = 2e-2, .atol = 2e-4, .rtol = 1e-3, .richardson = true};
  auto rx = test::gradcheck(loss, x.data(), n, dx.data(), opt);
  EXPECT_EQ(rx.failures, 0) << rx.describe("dx");
  for (auto& [name, p] : params.all()) {
    auto r = test::gradcheck(loss, p.value.data<float>(), p.value.numel(), p.grad.data<float>(), opt);
    EXPECT_EQ(r.failures, 0) << r.describe(name);
   
    EXPECT_GT(r.checked, 0);
  }
}

TEST(MlaAttention, GradientsMatchFiniteDifferencesWithQueryLoraAndInterleavedRope) {
  expect_gradients_match_finite_differences(8, true);
}

TEST(MlaAttention, GradientsMatchFiniteDifferencesWithQProjAndRotateHalfRope) {
  expect_gradients_match_finite_differences(0, false);
}

TEST(MlaAttention, AccumulatesWeightGradientsAcrossBackwardPasses) {
  const ModelConfig c = small_config(8, true);
  Params params;
  MlaAttention attn(c, params, kPrefix);
  randomize(params, 300);
  const int64_t batch = 1, seq = 4, n = batch * seq * c.hidden_size;
  const auto x = random_vector(n, 13), dy = random_vector(n, 14);
  std::vector<float> y(n), dx(n);
  auto step = [&] {
    attn.forward(x.data(), batch, seq, y.data(), Precision::FP32);
    attn.backward(dy.data(), dx.data());
  };
  params.zero_grad();
  step();
  std::vector<std::vector<float>> once;
  for (auto& [name, p] : params.all()) once.emplace_back(p.grad.span<float>().begin(), p.grad.span<float>().end());
  const std::vector<float> dx_once = dx;
  step();
  size_t k = 0;
  for (auto& [name, p] : params.all()) {
    const auto& first = once[k++];
    for (size_t i = 0; i < first.size(); ++i)
      ASSERT_EQ(p.grad.data<float>()[i], 2 * first[i]) << name << "[" << i << "]";  // x + x is exact
  }
  EXPECT_EQ(dx, dx_once);  // dx is overwritten each time
}

TEST(MlaAttention, LaterTokensDoNotChangeEarlierOutputs) {
  const ModelConfig c = small_config(8, true);
  Params params;
  MlaAttention attn(c, params, kPrefix);
  randomize(params, 400);
  const int64_t batch = 2, seq = 6, D = c.hidden_size, n = batch * seq * D;
  auto x = random_vector(n, 15);
  std::vector<float> before(n), after(n);
  attn.forward(x.data(), batch, seq, before.data(), Precision::FP32);
  const int64_t t = 3;  // token 3 of sequence 0
  for (int64_t j = 0; j < D; ++j) x[t * D + j] += 0.5f;
  attn.forward(x.data(), batch, seq, after.data(), Precision::FP32);
  // Every op is row-wise except attention, whose masked probabilities are exactly 0: earlier rows keep their bits.
  for (int64_t i = 0; i < t * D; ++i) ASSERT_EQ(after[i], before[i]) << "element " << i;
  for (int64_t r = t; r < seq; ++r) {
    int changed = 0;
    for (int64_t i = r * D; i < (r + 1) * D; ++i) changed += after[i] != before[i];
    EXPECT_GT(changed, 0) << "row " << r;  // later rows see the change
  }
  for (int64_t i = seq * D; i < n; ++i) ASSERT_EQ(after[i], before[i]) << "element " << i;  // other sequence
}

double relative_error(const std::vector<float>& a, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (double(a[i]) - ref[i]) * (double(a[i]) - ref[i]);
    den += double(ref[i]) * ref[i];
  }
  return std::sqrt(num / den);
}

TEST(MlaAttention, Bf16AndFp8StayCloseToFp32) {
  // Wide enough for whole 128-channel FP8 tiles.
  ModelConfig c;
  c.hidden_size = 256;
  c.num_attention_heads = 4;
  c.q_lora_rank = 128;
  c.kv_lora_rank = 128;
  c.qk_nope_head_dim = 32;
  c.qk_rope_head_dim = 16;
  c.v_head_dim = 32;
  Params params;
  MlaAttention attn(c, params, kPrefix);
  randomize(params, 500);
  const int64_t batch = 2, seq = 16, n = batch * seq * c.hidden_size;
  const auto x = random_vector(n, 16), dy = random_vector(n, 17);
  auto run = [&](Precision p, std::vector<float>& y, std::vector<float>& dx) {
    y.resize(n);
    dx.resize(n);
    attn.forward(x.data(), batch, seq, y.data(), p);
    attn.backward(dy.data(), dx.data());
  };
  std::vector<float> y32, dx32, y, dx;
  run(Precision::FP32, y32, dx32);
  // Relative RMS error against FP32. BF16 rounds operands to 8 significant bits (RMS ≈ 0.1% each); through up
  // to three GEMMs in a row, measured 0.6% (y) and 0.8% (dx): bound 2%. E4M3 keeps 4 significant bits (RMS
  // ≈ 3.6% per operand, ≈ 5% per GEMM with both quantized); measured 10% (y) and 12% (dx): bound 25%.
  run(Precision::BF16, y, dx);
  EXPECT_LT(relative_error(y, y32), 2e-2);
  EXPECT_LT(relative_error(dx, dx32), 2e-2);
  run(Precision::FP8, y, dx);
  EXPECT_LT(relative_error(y, y32), 0.25);
  EXPECT_LT(relative_error(dx, dx32), 0.25);
  for (auto& [name, p] : params.all())
    for (float v : p.grad.span<float>()) ASSERT_TRUE(std::isfinite(v)) << name;
}

}  // namespace
}  // namespace moerl
