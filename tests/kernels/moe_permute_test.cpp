#include "kernels/moe_permute.hpp"

#include <gtest/gtest.h>

#include <random>
#include <vector>

namespace moerl {
namespace {

TEST(MoePermute, SortsAssignmentsStablyByExpert) {
  // 4 tokens, K = 2, 3 experts; expert 1 gets no token.
  const std::vector<int32_t> idx = {2, 0, 0, 2, 2, 0, 0, 2};
  std::vector<int64_t> offsets(4), token_of(8), row_of(8);
  cpu::moe_permute_plan(idx.data(), 4, 2, 3, offsets.data(), token_of.data(), row_of.data());
  EXPECT_EQ(offsets, (std::vector<int64_t>{0, 4, 4, 8}));
  EXPECT_EQ(token_of, (std::vector<int64_t>{0, 1, 2, 3, 0, 1, 2, 3}));
  EXPECT_EQ(row_of, (std::vector<int64_t>{4, 0, 1, 5, 6, 2, 3, 7}));
}

TEST(MoePermute, GatherCombineAndScatterMatchAPerTokenLoop) {
  const int64_t T = 7, K = 3, E = 5, D = 4;
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  std::vector<int32_t> idx(T * K);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < K; ++k) idx[t * K + k] = static_cast<int32_t>((t * 2 + k * 3) % E);  // distinct per token
  std::vector<float> x(T * D), w(T * K), yp(T * K * D), dy(T * D);
  for (std::vector<float>* v : {&x, &w, &yp, &dy})
    for (float& value : *v) value = normal(rng);
  std::vector<int64_t> offsets(E + 1), token_of(T * K), row_of(T * K);
  cpu::moe_permute_plan(idx.data(), T, K, E, offsets.data(), token_of.data(), row_of.data());

  std::vector<float> xp(T * K * D);
  cpu::moe_gather(x.data(), token_of.data(), T * K, D, xp.data());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = row_of[t * K + k];
      EXPECT_GE(r, offsets[idx[t * K + k]]);
      EXPECT_LT(r, offsets[idx[t * K + k] + 1]);
      for (int64_t d = 0; d < D; ++d) EXPECT_EQ(xp[r * D + d], x[t * D + d]);
    }

  // Same operations in the same order as the per-token loop: bit-identical.
  std::vector<float> y(T * D, 1.0f), y_ref(T * D, 1.0f), dyp(T * K * D), dw(T * K), dx(T * D, 0.0f);
  cpu::moe_combine(yp.data(), w.data(), row_of.data(), T, K, D, y.data());
  cpu::moe_combine_backward(dy.data(), yp.data(), w.data(), row_of.data(), T, K, D, dyp.data(), dw.data());
  cpu::moe_scatter_add(dyp.data(), row_of.data(), T, K, D, dx.data());
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = row_of[t * K + k];
      float dot = 0;
      for (int64_t d = 0; d < D; ++d) {
        y_ref[t * D + d] += w[t * K + k] * yp[r * D + d];
        dot += dy[t * D + d] * yp[r * D + d];
        EXPECT_EQ(dyp[r * D + d], w[t * K + k] * dy[t * D + d]);
      }
      EXPECT_EQ(dw[t * K + k], dot);
    }
    for (int64_t d = 0; d < D; ++d) {
      float ref = 0;
      for (int64_t k = 0; k < K; ++k) ref += w[t * K + k] * dy[t * D + d];
      EXPECT_EQ(y[t * D + d], y_ref[t * D + d]);
      EXPECT_EQ(dx[t * D + d], ref);
    }
  }
}

}  // namespace
}  // namespace moerl
