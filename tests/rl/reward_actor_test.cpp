// The reward-model actor scores a rollout with a trained reward model's scalar head when its folder holds one
// (RewardModel::save), the same number as RewardModel::score on bos ... eos.
#include <gtest/gtest.h>

#include "actors/roles/reward_model.hpp"
#include "runtime/rl/reward_model.hpp"
#include "tests/actors/support.hpp"

namespace moerl::actors {
namespace {

using namespace moerl::actors::testing;

TEST(RewardModelActor, ScoresWithTheTrainedScalarHead) {
  const fs::path dir = fresh_dir("reward-head");
  const RemoveAtExit cleanup{dir};
  ModelConfig c;
  c.vocab_size = 32;
  c.hidden_size = 32;
  c.intermediate_size = 64;
  c.moe_intermediate_size = 16;
  c.num_attention_heads = 2;
  c.kv_lora_rank = 16;
  c.qk_nope_head_dim = 8;
  c.qk_rope_head_dim = 8;
  c.v_head_dim = 8;
  c.n_routed_experts = 4;
  c.max_position_embeddings = 64;
  c.initializer_range = 0.2;  // scores well away from 0, so a wrong path cannot agree by accident
  RewardModel rm(c);
  rm.init_random(4);
  rm.save(dir / "rm");

  caf::actor_system system{test_config()};
  caf::scoped_actor self{system};
  auto reward = spawn_reward_model(system, dir / "rm", Precision::FP32);
  msg::Rollout r;
  r.request_id = 3;
  r.sample_index = 1;
  r.prompt_ids = {0, 5, 9};
  r.response_ids = {12, 7, 1};  // ends in eos (1)
  r.log_probs = {-1.0f, -1.0f, -1.0f};
  msg::Rollout cut = r;
  cut.response_ids = {12, 7};  // cut by the length limit: eos appended before scoring
  cut.log_probs = {-1.0f, -1.0f};
  cut.finish_reason = msg::FinishReason::Length;
  const auto expected = rm.score({{0, 5, 9, 12, 7, 1}}, {3}, Precision::FP32).front();
  for (const auto& rollout : {r, cut}) {
    const auto score = ask<Envelope>(self, reward, nullptr, score_atom::value, wrap(rollout));
    ASSERT_TRUE(score);
    const auto s = unwrap<msg::RewardScore>(*score);
    EXPECT_EQ(s.request_id, 3u);
    EXPECT_EQ(s.sample_index, 1u);
    EXPECT_EQ(s.score, expected);  // the same forward on the same sequence
  }
}

}  // namespace
}  // namespace moerl::actors
