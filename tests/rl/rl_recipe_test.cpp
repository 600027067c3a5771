// The RLHF stage kinds of a recipe (reward_model, dpo, rlhf, eval_task): their fields, defaults and the errors
// that name file, line and field.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "runtime/error.hpp"
#include "runtime/recipe/recipe.hpp"

namespace moerl {
namespace {

namespace fs = std::filesystem;

const char* kHead = R"(name: rl
model:
  hidden_size: 32
  num_hidden_layers: 2
stages:
  - name: sft
    kind: sft
    data: task.jsonl
    steps: 10
)";

fs::path write_recipe(const std::string& name, const std::string& stages) {
  const fs::path dir = fs::temp_directory_path() / "moerl-rl-recipe-test";
  fs::create_directories(dir);
  const fs::path file = dir / name;
  std::ofstream(file) << kHead << stages;
  return file;
}

std::string error_of(const fs::path& file) {
  try {
    load_recipe(file);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(RlRecipe, ReadsTheFlowSftRewardModelRlhfEvalWithDefaults) {
  const Recipe r = load_recipe(write_recipe("flow.yaml", R"(  - name: rm
    kind: reward_model
    pairs: 500
    steps: 50
  - name: rl
    kind: rlhf
    algorithm: ppo
    group_size: 4
  - name: eval
    kind: eval_task
    problems: 100
  - name: dpo
    kind: dpo
    from: sft
    data: prefs.jsonl
    beta: 0.2
)"));
  ASSERT_EQ(r.stages.size(), 5u);
  EXPECT_EQ(r.stages[1].kind, "reward_model");
  EXPECT_EQ(r.stages[1].rl.pairs, 500);
  EXPECT_EQ(r.stages[1].rl.heldout_every, RlStageSpec{}.heldout_every);
  EXPECT_EQ(r.stages[2].rl.algorithm, "ppo");
  EXPECT_EQ(r.stages[2].rl.group_size, 4);
  EXPECT_EQ(r.stages[2].rl.reward_model, "");  // the last reward_model stage before it
  EXPECT_EQ(r.stages[3].rl.problems, 100);
  EXPECT_EQ(r.stages[4].rl.from, "sft");
  EXPECT_DOUBLE_EQ(r.stages[4].rl.beta, 0.2);
  EXPECT_EQ(r.stages[4].data.filename(), "prefs.jsonl");
  EXPECT_EQ(load_recipe(write_recipe("grpo.yaml", "  - name: rm\n    kind: reward_model\n  - name: rl\n    kind: rlhf\n"))
                .stages[2].rl.algorithm,
            "grpo");
}

TEST(RlRecipe, AnUnknownAlgorithmNamesFileLineAndField) {
  const std::string e = error_of(write_recipe("algo.yaml", R"(  - name: rm
    kind: reward_model
  - name: rl
    kind: rlhf
    algorithm: reinforce
)"));
  EXPECT_NE(e.find("algo.yaml:14"), std::string::npos) << e;
  EXPECT_NE(e.find("stages[2].algorithm"), std::string::npos) << e;
  EXPECT_NE(e.find("grpo or ppo"), std::string::npos) << e;
}

TEST(RlRecipe, RlhfWithoutAnEarlierRewardModelIsRefused) {
  const std::string e = error_of(write_recipe("norm.yaml", "  - name: rl\n    kind: rlhf\n"));
  EXPECT_NE(e.find("reward_model"), std::string::npos) << e;
  const std::string e2 = error_of(write_recipe("later.yaml", R"(  - name: rl
    kind: rlhf
    reward_model: rm
  - name: rm
    kind: reward_model
)"));
  EXPECT_NE(e2.find("stages[1].reward_model"), std::string::npos) << e2;
  EXPECT_NE(e2.find("not an earlier stage"), std::string::npos) << e2;
}

TEST(RlRecipe, FieldsOfAnotherKindAndBadValuesAreRefused) {
  // beta belongs to dpo: on a reward_model stage it is an unknown field.
  const std::string e = error_of(write_recipe("beta.yaml", "  - name: rm\n    kind: reward_model\n    beta: 0.1\n"));
  EXPECT_NE(e.find("stages[1].beta"), std::string::npos) << e;
  const std::string e2 = error_of(write_recipe("from.yaml", "  - name: d\n    kind: dpo\n    from: nowhere\n"));
  EXPECT_NE(e2.find("from.yaml"), std::string::npos) << e2;
  EXPECT_NE(e2.find("stages[1].from"), std::string::npos) << e2;
  const std::string e3 = error_of(write_recipe("digits.yaml", "  - name: e\n    kind: eval_task\n    task_digits: 7\n"));
  EXPECT_NE(e3.find("digits.yaml:12: stages[1].task_digits"), std::string::npos) << e3;
  const std::string e4 = error_of(write_recipe("kind.yaml", "  - name: x\n    kind: ppo\n"));
  EXPECT_NE(e4.find("reward_model, dpo, rlhf, eval_task"), std::string::npos) << e4;
  // Asynchronous rollouts are GRPO's: PPO's critic and GAE are on-policy.
  const std::string e5 = error_of(write_recipe(
      "stale.yaml", "  - name: rm\n    kind: reward_model\n  - name: rl\n    kind: rlhf\n    algorithm: ppo\n"
                    "    max_staleness: 1\n"));
  EXPECT_NE(e5.find("stages[2].max_staleness"), std::string::npos) << e5;
  EXPECT_NE(e5.find("need algorithm grpo"), std::string::npos) << e5;
}

TEST(RlRecipe, ReadsTaskSftPreferencesAndTheRewardSource) {
  const Recipe r = load_recipe(write_recipe("prefs.yaml", R"(  - name: tsft
    kind: task_sft
    steps: 20
  - name: prefs
    kind: preferences
    pairs: 300
    annotator: human
  - name: rm
    kind: reward_model
    preferences: prefs
  - name: rl
    kind: rlhf
  - name: rl_checker
    kind: rlhf
    reward: checker
)"));
  ASSERT_EQ(r.stages.size(), 6u);
  EXPECT_EQ(r.stages[1].kind, "task_sft");
  EXPECT_EQ(r.stages[2].rl.pairs, 300);
  EXPECT_EQ(r.stages[2].rl.annotator, "human");
  EXPECT_EQ(r.stages[3].rl.preferences, "prefs");
  EXPECT_EQ(r.stages[4].rl.reward, "reward_model");  // the default: RLHF is rewarded by the reward model
  EXPECT_EQ(r.stages[5].rl.reward, "checker");
  // reward: checker needs no reward model; an unknown reward source or annotator is refused.
  EXPECT_EQ(error_of(write_recipe("chk.yaml", "  - name: rl\n    kind: rlhf\n    reward: checker\n")), "");
  const std::string e = error_of(write_recipe("rew.yaml", "  - name: rl\n    kind: rlhf\n    reward: oracle\n"));
  EXPECT_NE(e.find("stages[1].reward"), std::string::npos) << e;
  const std::string e2 =
      error_of(write_recipe("ann.yaml", "  - name: p\n    kind: preferences\n    annotator: robot\n"));
  EXPECT_NE(e2.find("stages[1].annotator"), std::string::npos) << e2;
  const std::string e3 = error_of(write_recipe("data.yaml", "  - name: p\n    kind: preferences\n    data: x.jsonl\n"));
  EXPECT_NE(e3.find("stages[1].data"), std::string::npos) << e3;
}

}  // namespace
}  // namespace moerl
