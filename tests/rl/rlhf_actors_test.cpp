// The rlhf stage through the actor runtime (actors/roles/rlhf_actors.hpp): GRPO and PPO give the in-process
// stage's metrics and final weights bit for bit, each rollout is tagged with the version of the policy that made
// it, and a rollout or reward-model actor killed mid-stage is restarted once (logged once) with the run's results
// unchanged; an actor that keeps dying stops the stage with an error naming it.
#include <gtest/gtest.h>
#include <omp.h>

#include <fstream>
#include <iterator>
#include <map>
#include <optional>
#include <random>

#include "actors/roles/rlhf_actors.hpp"
#include "runtime/error.hpp"
#include "runtime/train/rlhf_stage.hpp"
#include "runtime/train/run_recipe.hpp"
#include "tests/actors/support.hpp"
#include "tests/rl/flow_support.hpp"

namespace moerl::actors {
namespace {

using namespace moerl::actors::testing;

// A tiny pretrain and reward-model run (as tests/rl/rl_stages_test.cpp's), then `rl` with its reward model.
Recipe base_recipe(const fs::path& corpus, const fs::path& out) {
  return test::tiny_rm_recipe("rlhf-actors", corpus, out, 10, 100);
}

StageSpec rl_stage(const std::string& algorithm, int64_t max_staleness = 0) {
  StageSpec rl;
  rl.rl.max_staleness = max_staleness;
  rl.name = "rl";
  rl.kind = "rlhf";
  rl.steps = 3;
  rl.batch = 2;
  rl.bias_gamma = 0.01;  // the router bias update between steps is part of what the rollout must see
  rl.rl.algorithm = algorithm;
  rl.rl.task_digits = 1;
  rl.rl.group_size = 4;
  rl.rl.max_new_tokens = 4;
  rl.optimizer.lr = 1e-2;  // large enough that the policy moves visibly in 3 steps
  return rl;
}

// The pretrained policy and reward model, made once per test binary run and copied into each run folder.
const fs::path& base_run() {
  static const fs::path dir = [] {
    const fs::path d = fresh_dir("rlhf-actors-base");
    static const RemoveAtExit cleanup{d};  // at the binary's exit
    const test::RestoreThreads restore;
    run_recipe(base_recipe(test::write_sums_corpus(d), d / "run"));
    return d;
  }();
  return dir;
}

struct RlOutcome {
  std::vector<std::string> rows;  // the rl stage's metrics rows, as written
  int restarts = 0;               // restart events in metrics.jsonl
  std::string weights;            // rl/model.safetensors, bytes
  nlohmann::json stage;           // the stage's summary
};

std::string read_all(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// Runs the recipe's rl stage (the base stages skipped) in a copy of the base run, with `factory`'s services
// (empty: in process).
RlOutcome run_rl(const std::string& name, const std::string& algorithm, const RlhfServicesFactory& factory,
                 int64_t max_staleness = 0) {
  const fs::path dir = fresh_dir("rlhf-actors-" + name);
  const RemoveAtExit cleanup{dir};
  fs::copy(base_run() / "run", dir / "run", fs::copy_options::recursive);
  Recipe recipe = base_recipe(base_run() / "corpus.jsonl", dir / "run");
  recipe.stages.push_back(rl_stage(algorithm, max_staleness));
  nlohmann::json summary;
  {
    const test::RestoreThreads restore;
    std::optional<ScopedRlhfServices> scoped;
    if (factory) scoped.emplace(factory);
    summary = run_recipe(recipe);
  }
  RlOutcome out;
  std::ifstream in(recipe.out / "metrics.jsonl");
  for (std::string line; std::getline(in, line);) {
    const auto j = nlohmann::json::parse(line);
    if (j.value("event", "") == "restart") ++out.restarts;
    if (j.value("stage", "") == "rl" && !j.contains("event")) out.rows.push_back(line);
  }
  out.weights = read_all(recipe.out / "rl" / "model.safetensors");
  out.stage = summary["stages"].back();
  return out;
}

const RlOutcome& in_process(const std::string& algorithm) {
  static std::map<std::string, RlOutcome> done;
  if (!done.count(algorithm)) done[algorithm] = run_rl("in-process-" + algorithm, algorithm, {});
  return done[algorithm];
}

void expect_same_run(const RlOutcome& actors, const RlOutcome& direct) {
  ASSERT_EQ(direct.rows.size(), 3u);
  EXPECT_EQ(actors.rows, direct.rows);  // every metric of every step, to the last bit of its decimal form
  EXPECT_TRUE(actors.weights == direct.weights) << "the final policies differ";
  for (const char* field : {"reward", "reward_mean", "sampled_accuracy", "kl_to_reference"})
    EXPECT_EQ(actors.stage[field], direct.stage[field]) << field;
}

TEST(RlhfActors, GrpoThroughTheRolloutAndRewardActorsMatchesTheInProcessStageBitForBit) {
  caf::actor_system system{test_config()};
  RlhfActorOptions options;
  std::vector<std::vector<uint64_t>> versions;  // per step, of each rollout
  options.record = [&](int64_t step, const std::vector<msg::Rollout>& rollouts, std::span<const float> rewards) {
    EXPECT_EQ(static_cast<size_t>(step), versions.size());
    EXPECT_EQ(rewards.size(), rollouts.size());
    versions.emplace_back();
    for (const auto& r : rollouts) versions.back().push_back(r.policy_version.version);
  };
  const RlOutcome actors = run_rl("grpo-actors", "grpo", actor_rlhf_services_factory(system, options));
  expect_same_run(actors, in_process("grpo"));
  EXPECT_EQ(actors.restarts, 0);
  // Step s generates with the policy after s updates: 2 prompts x 4 samples, all tagged s.
  ASSERT_EQ(versions.size(), 3u);
  for (uint64_t s = 0; s < 3; ++s) EXPECT_EQ(versions[s], std::vector<uint64_t>(8, s));
  // The policy moved: the three steps' losses are not all equal (the comparison above can fail).
  EXPECT_NE(actors.rows.front(), actors.rows.back());
}

TEST(RlhfActors, AsynchronousRolloutsAreGeneratedDuringTheUpdateOneVersionOldAndImportanceWeighted) {
  // max_staleness 1: step s+1's rollouts are generated (from a snapshot of the policy) while step s's update
  // runs, so the rollouts of step s >= 1 come from version s-1 and the update at version s weighs them by the
  // ratio to their behaviour log-probs; within the bound, no group is dropped.
  caf::actor_system system{test_config()};
  RlhfActorOptions options;
  std::vector<std::vector<uint64_t>> versions;  // per step, of each rollout
  options.record = [&](int64_t, const std::vector<msg::Rollout>& rollouts, std::span<const float>) {
    versions.emplace_back();
    for (const auto& r : rollouts) versions.back().push_back(r.policy_version.version);
  };
  const RlOutcome async = run_rl("grpo-async", "grpo", actor_rlhf_services_factory(system, options), 1);
  ASSERT_EQ(versions.size(), 3u);
  EXPECT_EQ(versions[0], std::vector<uint64_t>(8, 0));
  EXPECT_EQ(versions[1], std::vector<uint64_t>(8, 0));
  EXPECT_EQ(versions[2], std::vector<uint64_t>(8, 1));
  ASSERT_EQ(async.rows.size(), 3u);
  for (size_t s = 0; s < 3; ++s) {
    const auto row = nlohmann::json::parse(async.rows[s]);
    EXPECT_EQ(row["policy_version"].get<uint64_t>(), s);
    EXPECT_EQ(row["rollout_version"].get<uint64_t>(), s == 0 ? 0 : s - 1);
  }
  EXPECT_EQ(async.stage["max_staleness"], 1);
  EXPECT_EQ(async.stage["stale_groups_dropped"], 0);
  // Step 1 is the synchronous step's (same rollouts, same version: ratio 1); step 2 learns from stale rollouts.
  const auto sync_row = nlohmann::json::parse(in_process("grpo").rows[0]);
  EXPECT_EQ(nlohmann::json::parse(async.rows[0])["reward"], sync_row["reward"]);
  EXPECT_NE(async.weights, in_process("grpo").weights);
}

TEST(RlhfActors, PpoThroughTheActorsMatchesTheInProcessStageBitForBit) {
  caf::actor_system system{test_config()};
  const RlOutcome actors = run_rl("ppo-actors", "ppo", actor_rlhf_services_factory(system));
  expect_same_run(actors, in_process("ppo"));
  EXPECT_NE(actors.rows.front().find("value_loss"), std::string::npos);
}

// Kills `victim` just before its request number `at` (0-based, weights included), once. `wait`: until it is
// gone, so the services mostly learn it from the down message; otherwise mostly from the request bouncing
// (which comes first is up to the scheduler: either way the actor is restarted once).
RlhfActorOptions kill_once(caf::actor_system& system, const std::string& victim, uint64_t at, bool wait) {
  RlhfActorOptions options;
  options.before_request = [&system, victim, at, wait](const std::string& name, const caf::actor& actor,
                                                      uint64_t sent) {
    if (name != victim || sent != at) return;
    caf::scoped_actor killer{system};
    killer->send_exit(actor, caf::exit_reason::kill);
    if (wait) killer->wait_for(actor);
  };
  return options;
}

size_t count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

TEST(RlhfActors, AKilledRolloutActorIsRestartedOnceAndTheRunEndsAsIfUndisturbed) {
  caf::actor_system system{test_config()};
  // Requests to the rollout: weights, 2 prompts, weights, 2 prompts, ...: number 4 is step 2's first prompt.
  ::testing::internal::CaptureStderr();
  const RlOutcome killed =
      run_rl("kill-rollout", "grpo", actor_rlhf_services_factory(system, kill_once(system, kRlhfRolloutName, 4, true)));
  const std::string log = ::testing::internal::GetCapturedStderr();
  expect_same_run(killed, in_process("grpo"));
  EXPECT_EQ(killed.restarts, 1);
  EXPECT_EQ(count(log, "rollout/0 died"), 1u) << log;
  EXPECT_NE(log.find("at step 2 of rl"), std::string::npos) << log;
}

TEST(RlhfActors, AKilledRewardModelActorIsRestartedOnceAndTheRunEndsAsIfUndisturbed) {
  caf::actor_system system{test_config()};
  // Score requests: 8 per step; number 11 is in step 2.
  ::testing::internal::CaptureStderr();
  const RlOutcome killed =
      run_rl("kill-reward", "grpo",
             actor_rlhf_services_factory(system, kill_once(system, kRlhfRewardModelName, 11, false)));
  const std::string log = ::testing::internal::GetCapturedStderr();
  expect_same_run(killed, in_process("grpo"));
  EXPECT_EQ(killed.restarts, 1);
  EXPECT_EQ(count(log, "reward_model/0 died"), 1u) << log;
}

TEST(RlhfActors, ARolloutActorThatKeepsDyingStopsTheStageNamingIt) {
  caf::actor_system system{test_config()};
  RlhfActorOptions options;
  options.before_request = [](const std::string& name, const caf::actor& actor, uint64_t sent) {
    if (name == kRlhfRolloutName && sent >= 1) caf::anon_send_exit(actor, caf::exit_reason::kill);
  };
  ::testing::internal::CaptureStderr();
  try {
    run_rl("keeps-dying", "grpo", actor_rlhf_services_factory(system, options));
    ::testing::internal::GetCapturedStderr();
    FAIL() << "the stage went on with a rollout actor that dies at every request";
  } catch (const Error& e) {
    const std::string log = ::testing::internal::GetCapturedStderr();
    const std::string what = e.what();
    EXPECT_NE(what.find("rollout/0"), std::string::npos) << what;
    EXPECT_NE(what.find("restarted 3 times"), std::string::npos) << what;
    EXPECT_EQ(count(log, "rollout/0 died"), 3u) << log;
  }
}

}  // namespace
}  // namespace moerl::actors
