#include "kernels/rope.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "tests/support/gradcheck.hpp"

namespace moerl {
namespace {

std::vector<float> random_vector(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// HF DeepseekV3RotaryEmbedding (default rope), naively: cos/sin [dim] = cat(freqs, freqs) for one position.
void hf_cos_sin(int64_t pos, int64_t dim, float theta, std::vector<float>& cos_v, std::vector<float>& sin_v) {
  cos_v.resize(dim);
  sin_v.resize(dim);
  for (int64_t i = 0; i < dim / 2; ++i) {
    const float inv_freq = 1.0f / static_cast<float>(std::pow(double(theta), double(float(2 * i) / float(dim))));
    const float angle = float(pos) * inv_freq;
    cos_v[i] = cos_v[i + dim / 2] = static_cast<float>(std::cos(double(angle)));
    sin_v[i] = sin_v[i + dim / 2] = static_cast<float>(std::sin(double(angle)));
  }
}

// HF apply_rotary_pos_emb on one vector: x·cos + rotate_half(x)·sin, rotate_half(x) = cat(−x2, x1).
std::vector<float> hf_rotate_half_rope(const std::vector<float>& x, int64_t pos, float theta) {
  const int64_t dim = static_cast<int64_t>(x.size()), half = dim / 2;
  std::vector<float> c, s, y(dim);
  hf_cos_sin(pos, dim, theta, c, s);
  for (int64_t i = 0; i < dim; ++i) {
    const float rot = i < half ? -x[i + half] : x[i - half];
    y[i] = x[i] * c[i] + rot * s[i];
  }
  return y;
}

// HF apply_rotary_pos_emb_interleave: view(d/2, 2).transpose -> (x0, x2, ..., x1, x3, ...), then rotate-half rope;
// the result stays in that de-interleaved order.
std::vector<float> hf_interleave_rope(const std::vector<float>& x, int64_t pos, float theta) {
  const int64_t dim = static_cast<int64_t>(x.size()), half = dim / 2;
  std::vector<float> deinterleaved(dim);
  for (int64_t i = 0; i < half; ++i) {
    deinterleaved[i] = x[2 * i];
    deinterleaved[i + half] = x[2 * i + 1];
  }
  return hf_rotate_half_rope(deinterleaved, pos, theta);
}

// Layout of the tests: q-like rows [tokens, heads * (nope + dim)], the rope part after `nope` in each head.
struct Layout {
  int64_t batch = 2, seq = 5, heads = 3, nope = 2, dim = 8;
  float theta = 10000.0f;
  int64_t tokens() const { return batch * seq; }
  int64_t head_stride() const { return nope + dim; }
  int64_t row_stride() const { return heads * head_stride(); }
  int64_t size() const { return tokens() * row_stride(); }
};

void apply(const Layout& l, float* x, bool interleave, bool backward = false) {
  auto fn = backward ? cpu::rope_backward : cpu::rope_forward;
  fn(x + l.nope, l.tokens(), l.seq, l.heads, l.row_stride(), l.head_stride(), l.dim, l.theta, interleave);
}

void expect_matches_hf(bool interleave) {
  const Layout l;
  auto x = random_vector(l.size(), interleave ? 1 : 2);
  auto y = x;
  apply(l, y.data(), interleave);
  for (int64_t t = 0; t < l.tokens(); ++t)
    for (int64_t h = 0; h < l.heads; ++h) {
      const int64_t base = t * l.row_stride() + h * l.head_stride();
      std::vector<float> v(x.begin() + base + l.nope, x.begin() + base + l.nope + l.dim);
      const int64_t pos = t % l.seq;
      std::vector<float> want = interleave ? hf_interleave_rope(v, pos, l.theta) : hf_rotate_half_rope(v, pos, l.theta);
      for (int64_t i = 0; i < l.dim; ++i) {
        // Our interleaved output keeps the original order; HF's is de-interleaved: dim i of HF's result is our
        // dim 2i (first half) or 2(i − dim/2) + 1 (second half).
        const int64_t ours = !interleave ? i : i < l.dim / 2 ? 2 * i : 2 * (i - l.dim / 2) + 1;
        // Same FP32 operations on the same tables up to one ulp of cos/sin from the libm calls: 1e-6 absolute
        // on O(1) values.
        EXPECT_NEAR(y[base + l.nope + ours], want[i], 1e-6f) << "token " << t << " head " << h << " dim " << i;
      }
      for (int64_t i = 0; i < l.nope; ++i) EXPECT_EQ(y[base + i], x[base + i]);  // the nope part is untouched
    }
}

TEST(Rope, InterleavedPairRotationEqualsHfDeinterleaveAndRotateHalf) { expect_matches_hf(true); }

TEST(Rope, RotateHalfLayoutEqualsHfApplyRotaryPosEmb) { expect_matches_hf(false); }

TEST(Rope, RotatesTheFirstPairByThePositionInRadians) {
  // inv_freq[0] = 1: at position p the first pair turns by p radians; position 0 is the identity.
  for (bool interleave : {true, false}) {
    Layout l;
    l.batch = 1;
    l.seq = 3;
    l.heads = 1;
    l.nope = 0;
    l.dim = 4;
    std::vector<float> x(l.size(), 0.0f);
    for (int64_t t = 0; t < l.seq; ++t) x[t * l.dim] = 1.0f;  // a = 1, b = 0 for the first pair
    apply(l, x.data(), interleave);
    const int64_t b_index = interleave ? 1 : 2;
    for (int64_t t = 0; t < l.seq; ++t) {
      EXPECT_NEAR(x[t * l.dim], std::cos(double(t)), 1e-7);  // FP32 rounding of cos
      EXPECT_NEAR(x[t * l.dim + b_index], std::sin(double(t)), 1e-7);
    }
  }
}

TEST(Rope, ScoresDependOnlyOnTheRelativePosition) {
  // The same q and k placed at positions (5, 3) and at (2, 0): q·k after RoPE must agree.
  for (bool interleave : {true, false}) {
    const int64_t dim = 16, seq = 6;
    auto qv = random_vector(dim, 3), kv = random_vector(dim, 4);
    std::vector<float> q(seq * dim), k(seq * dim);
    for (int64_t t = 0; t < seq; ++t)
      for (int64_t i = 0; i < dim; ++i) q[t * dim + i] = qv[i], k[t * dim + i] = kv[i];
    cpu::rope_forward(q.data(), seq, seq, 1, dim, dim, dim, 10000.0f, interleave);
    cpu::rope_forward(k.data(), seq, seq, 1, dim, dim, dim, 10000.0f, interleave);
    const double far = test::dot_double(q.data() + 5 * dim, k.data() + 3 * dim, dim);
    const double near = test::dot_double(q.data() + 2 * dim, k.data() + 0 * dim, dim);
    EXPECT_NEAR(far, near, 1e-5);  // FP32 rotations of O(1) vectors, 16 products
    const double other = test::dot_double(q.data() + 4 * dim, k.data() + 0 * dim, dim);
    EXPECT_GT(std::fabs(far - other), 1e-3);  // and it does depend on the distance
  }
}

void expect_backward_matches_finite_differences(bool interleave) {
  const Layout l;
  auto x = random_vector(l.size(), 5), g = random_vector(l.size(), 6);
  std::vector<float> y(x.size());
  auto loss = [&] {
    y = x;
    apply(l, y.data(), interleave);
    return test::dot_double(y.data(), g.data(), l.size());
  };
  // RoPE is linear in x: the analytic gradient is Rᵀ g, only the nope part passes g through unchanged.
  auto dx = g;
  apply(l, dx.data(), interleave, /*backward=*/true);
  // Linear: no truncation error, so h can be large (0.5); what is left is the FP32 rounding of y, ~300 terms
  // of 6e-8 · |g y| summed ≈ 1e-6, divided by 2h = 1 -> 1e-6. atol 1e-5.
  auto r = test::gradcheck(loss, x.data(), x.size(), dx.data(), {.step = 0.5, .atol = 1e-5, .rtol = 1e-5});
  EXPECT_EQ(r.failures, 0) << r.describe(interleave ? "dx (interleaved)" : "dx (rotate-half)");
}

TEST(Rope, BackwardMatchesFiniteDifferencesInterleaved) { expect_backward_matches_finite_differences(true); }

TEST(Rope, BackwardMatchesFiniteDifferencesRotateHalf) { expect_backward_matches_finite_differences(false); }

TEST(Rope, BackwardUndoesForward) {
  // Rotations are orthogonal: Rᵀ R x = x.
  const Layout l;
  auto x = random_vector(l.size(), 7);
  auto y = x;
  apply(l, y.data(), true);
  apply(l, y.data(), true, /*backward=*/true);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(y[i], x[i], 1e-6f);  // two FP32 rotations of O(1) values
}

}  // namespace
}  // namespace moerl
