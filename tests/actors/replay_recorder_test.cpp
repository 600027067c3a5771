// An rlhf stage's record hook into the replay buffer actor: each step's rollouts become durable ReplayRecords
// with the reward, GRPO's group-normalized advantages and the policy version, iterable by version, kept across
// a kill of the buffer.
#include "actors/roles/replay_recorder.hpp"
#include "runtime/rl/grpo.hpp"
#include "tests/actors/support.hpp"

namespace moerl::actors {
namespace {

using namespace moerl::actors::testing;

// Step `step`'s rollouts: 2 requests x 2 samples of policy version `version`.
std::vector<msg::Rollout> rollouts(uint64_t version) {
  std::vector<msg::Rollout> out;
  for (uint64_t request = 1; request <= 2; ++request)
    for (uint32_t s = 0; s < 2; ++s) {
      msg::Rollout r;
      r.request_id = 100 * version + request;
      r.sample_index = s;
      r.prompt_ids = {0, 5, 6};
      r.response_ids = {7, 8, static_cast<int32_t>(9 + s)};
      r.log_probs = {-0.1f, -0.2f, -0.3f};
      r.policy_version = {version, version};
      out.push_back(r);
    }
  return out;
}

TEST(ReplayRecorder, StoresEachStepsRolloutsWithRewardsAndGroupAdvantagesDurablyByPolicyVersion) {
  const auto dir = fresh_dir("replay-recorder");
  RemoveAtExit cleanup{dir};
  caf::actor_system system{test_config()};
  caf::scoped_actor self{system};
  const std::string folder = (dir / "replay").string();
  auto buffer = spawn_replay_buffer(system, 100, "replay_buffer/0", folder);
  const std::vector<float> rewards0 = {1.0f, 0.0f, 0.5f, 0.5f}, rewards1 = {0.2f, 0.8f, 0.0f, 1.0f};
  {
    const auto record = replay_recorder(system, buffer, "rlhf");
    record(0, rollouts(0), rewards0);
    record(1, rollouts(1), rewards1);
  }
  const auto kill = [&] {
    self->monitor(buffer);
    self->send_exit(buffer, caf::exit_reason::kill);
    self->receive([](const caf::down_msg&) {});
  };
  kill();
  buffer = spawn_replay_buffer(system, 100, "replay_buffer/0", folder);
  const auto v1 = ask<std::vector<Envelope>>(self, buffer, nullptr, version_atom::value, uint64_t{1}, uint64_t{2}, uint64_t{10});
  ASSERT_TRUE(v1);
  ASSERT_EQ(v1->size(), 4u);
  const auto expected_advantages = rl::group_advantages(rewards1, 2, true);
  for (size_t i = 0; i < 4; ++i) {
    const auto r = unwrap<msg::ReplayRecord>((*v1)[i]);
    EXPECT_EQ(r.rollout, rollouts(1)[i]) << i;
    EXPECT_EQ(r.score, rewards1[i]) << i;
    EXPECT_EQ(r.rewards, (std::vector<float>{0.0f, 0.0f, rewards1[i]})) << i;
    EXPECT_EQ(r.advantages, std::vector<float>(3, expected_advantages[i])) << i;
    EXPECT_EQ(r.group_id, r.rollout.request_id);
    EXPECT_EQ(r.step, (msg::StepId{"rlhf", 2}));
  }
  EXPECT_GT(expected_advantages[1], expected_advantages[0]);  // the better sample of a group has the larger one
  EXPECT_EQ(ask<uint64_t>(self, buffer, nullptr, size_atom::value), 8u);
  // Rewards that do not match the rollouts are refused before anything is written.
  EXPECT_THROW(replay_recorder(system, buffer, "rlhf")(2, rollouts(2), std::span(rewards0).subspan(0, 3)), Error);
  EXPECT_EQ(ask<uint64_t>(self, buffer, nullptr, size_atom::value), 8u);
  kill();
}

}  // namespace
}  // namespace moerl::actors
