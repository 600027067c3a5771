#include "runtime/rl/generate.hpp"

#include <cmath>

#include <gtest/gtest.h>

#include "runtime/error.hpp"
#include "tests/rl/tiny_model.hpp"

namespace moerl::rl {
namespace {

std::vector<std::vector<int32_t>> some_prompts() {
  return {prompt_ids(make_problem(AdditionTask{}, 12, 34)), prompt_ids(make_problem(AdditionTask{}, 99, 7)),
          {0, 5}, prompt_ids(make_problem(AdditionTask{}, 50, 50))};
}

TEST(KvCacheDecode, GivesTheFullForwardsLogitsAtEveryPosition) {
  for (bool moe : {false, true}) {
    Model m(testing::tiny_config(moe));
    m.init_random(11);
    const int64_t B = 2, P = 5, S = 9, V = kTaskVocab;
    std::vector<int64_t> ids(static_cast<size_t>(B * S));
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int64_t>((i * 7 + 3) % V);
    // Full forward over [B, S].
    const std::vector<int64_t> labels(ids.size(), kIgnoreLabel);
    ForwardOptions o;
    o.keep_logits = true;
    o.for_backward = false;
    m.forward(TokenBatch{ids.data(), labels.data(), B, S}, o);
    const std::vector<float> full(m.logits(), m.logits() + B * S * V);
    // Prefill P positions, then one at a time.
    KvCache cache = m.new_cache(B, S);
    std::vector<float> got(static_cast<size_t>(B * S * V)), step(static_cast<size_t>(B * P * V));
    std::vector<int64_t> chunk(static_cast<size_t>(B * P));
    for (int64_t b = 0; b < B; ++b) std::copy_n(ids.begin() + b * S, P, chunk.begin() + b * P);
    m.decode(chunk.data(), P, cache, step.data(), Precision::FP32);
    for (int64_t b = 0; b < B; ++b) std::copy_n(step.begin() + b * P * V, P * V, got.begin() + b * S * V);
    for (int64_t pos = P; pos < S; ++pos) {
      const int64_t next[B] = {ids[static_cast<size_t>(pos)], ids[static_cast<size_t>(S + pos)]};
      m.decode(next, 1, cache, step.data(), Precision::FP32);
      for (int64_t b = 0; b < B; ++b) std::copy_n(step.begin() + b * V, V, got.begin() + (b * S + pos) * V);
    }
    EXPECT_EQ(cache.length, S);
    double max_diff = 0, max_abs = 0;
    for (size_t i = 0; i < full.size(); ++i) {
      max_diff = std::max(max_diff, std::abs(static_cast<double>(got[i]) - full[i]));
      max_abs = std::max(max_abs, std::abs(static_cast<double>(full[i])));
    }
    // Same FP32 arithmetic except the summation order of GEMM rows and of the attention dot products
    // (hand loops vs the blocked kernel): ~1e-6 relative per op over two layers; 1e-4 of the logits' scale.
    EXPECT_LT(max_diff, 1e-4 * max_abs) << (moe ? "moe" : "dense") << " max diff " << max_diff;
    EXPECT_THROW(m.decode(ids.data(), 1, cache, step.data(), Precision::FP32), Error);  // the cache is full
  }
}

TEST(KvCacheGeneration, GreedyGivesExactlyTheTokensOfFullForwardDecoding) {
  Model m(testing::tiny_config(true));
  m.init_random(12);
  msg::SamplingParams s;
  s.temperature = 0;
  s.max_new_tokens = 12;
  const auto prompts = some_prompts();
  const std::vector<uint64_t> streams{0, 1, 2, 3};
  const auto cached = generate(m, prompts, s, streams, Precision::FP32);
  for (size_t i = 0; i < prompts.size(); ++i) {
    const GeneratedSequence ref = generate_uncached(m, prompts[i], s, streams[i], Precision::FP32);
    EXPECT_EQ(cached[i].ids, ref.ids) << "prompt " << i;
    ASSERT_EQ(cached[i].log_probs.size(), ref.log_probs.size());
    for (size_t j = 0; j < ref.log_probs.size(); ++j)
      EXPECT_NEAR(cached[i].log_probs[j], ref.log_probs[j], 1e-4);  // the logits' tolerance above, through a log-softmax
    EXPECT_EQ(cached[i].ids.size(), 12u);
    EXPECT_EQ(cached[i].finish, msg::FinishReason::Length);
  }
}

TEST(KvCacheGeneration, SamplingIsReproducibleAndIndependentOfBatching) {
  Model m(testing::tiny_config(false));
  m.init_random(13);
  msg::SamplingParams s;
  s.temperature = 1.5f;
  s.top_k = 8;
  s.top_p = 0.9f;
  s.max_new_tokens = 10;
  s.seed = 77;
  const auto prompts = some_prompts();
  const std::vector<uint64_t> streams{5, 6, 7, 8};
  const auto a = generate(m, prompts, s, streams, Precision::FP32);
  const auto b = generate(m, prompts, s, streams, Precision::FP32);
  for (size_t i = 0; i < prompts.size(); ++i) {
    EXPECT_EQ(a[i].ids, b[i].ids);
    const auto alone = generate(m, std::span(prompts).subspan(i, 1), s, std::span(streams).subspan(i, 1),
                                Precision::FP32);
    EXPECT_EQ(alone[0].ids, a[i].ids) << "prompt " << i;
    EXPECT_EQ(generate_uncached(m, prompts[i], s, streams[i], Precision::FP32).ids, a[i].ids);
  }
  s.seed = 78;
  const auto c = generate(m, prompts, s, streams, Precision::FP32);
  int differ = 0;
  for (size_t i = 0; i < prompts.size(); ++i) differ += c[i].ids != a[i].ids;
  EXPECT_GT(differ, 0);
}

TEST(Sampling, KeepsOnlyTheTopKAndTheNucleus) {
  const float row[5] = {0.0f, 3.0f, 2.9f, 1.0f, -1.0f};
  msg::SamplingParams s;
  s.temperature = 1.0f;
  s.top_k = 2;
  for (double u = 0; u < 1; u += 0.01) {
    const int32_t id = sample_id(row, 5, s, u);
    EXPECT_TRUE(id == 1 || id == 2) << id;
  }
  s.top_k = 0;
  s.top_p = 0.3f;  // id 1 alone holds ~46% of the mass
  for (double u = 0; u < 1; u += 0.01) EXPECT_EQ(sample_id(row, 5, s, u), 1);
  s.temperature = 0;
  EXPECT_EQ(sample_id(row, 5, s, 0.99), 1);
}

TEST(KvCacheGeneration, StopsAtAStopIdAndAtTheContext) {
  Model m(testing::tiny_config(false));
  m.init_random(14);
  msg::SamplingParams s;
  s.temperature = 0;
  s.max_new_tokens = 6;
  const std::vector<std::vector<int32_t>> prompts{{0, 3, 4}};
  const std::vector<uint64_t> streams{0};
  const auto free_run = generate(m, prompts, s, streams, Precision::FP32)[0];
  ASSERT_EQ(free_run.ids.size(), 6u);
  s.stop_ids = {free_run.ids[2]};
  const auto stopped = generate(m, prompts, s, streams, Precision::FP32)[0];
  const auto first = std::find(free_run.ids.begin(), free_run.ids.end(), free_run.ids[2]) - free_run.ids.begin();
  EXPECT_EQ(stopped.ids, std::vector<int32_t>(free_run.ids.begin(), free_run.ids.begin() + first + 1));
  EXPECT_EQ(stopped.finish, msg::FinishReason::Stop);
  s.stop_ids.clear();
  s.max_new_tokens = 1000;
  const auto to_context = generate(m, prompts, s, streams, Precision::FP32)[0];
  EXPECT_EQ(to_context.ids.size(), 64u - 3u);  // max_position_embeddings 64
  EXPECT_EQ(to_context.finish, msg::FinishReason::Length);
}

}  // namespace
}  // namespace moerl::rl
