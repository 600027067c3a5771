// moerl run with the RLHF stage kinds: pretraining, then a reward model on machine-judged task pairs, DPO on
// the same kind of pairs, GRPO (or PPO) and the task evaluation, chained in one run_recipe; summary.json reports the held-out pairwise accuracy and a
// second run skips the finished stages.
#include "runtime/train/rl_stages.hpp"

#include <gtest/gtest.h>
#include <omp.h>

#include <fstream>
#include <iterator>
#include <random>

#include "runtime/error.hpp"
#include "runtime/rl/preferences.hpp"
#include "runtime/rl/reward_model.hpp"
#include "runtime/train/run_recipe.hpp"
#include "tests/rl/flow_support.hpp"

namespace moerl {
namespace {

namespace fs = std::filesystem;

Recipe flow_recipe(const fs::path& dir) {
  Recipe r = test::tiny_rm_recipe("flow", test::write_sums_corpus(dir), dir / "run", 30, 300);
  r.file = dir / "recipe.yaml";
  StageSpec dpo = r.stages.back();
  dpo.name = "dpo";
  dpo.kind = "dpo";
  dpo.steps = 10;
  r.stages.push_back(dpo);
  StageSpec rl;
  rl.name = "rl";
  rl.kind = "rlhf";  // GRPO by default
  rl.steps = 3;
  rl.batch = 2;
  rl.rl.task_digits = 1;
  rl.rl.group_size = 4;
  rl.rl.max_new_tokens = 4;
  rl.optimizer.lr = 1e-3;
  r.stages.push_back(rl);
  StageSpec eval;
  eval.name = "eval";
  eval.kind = "eval_task";
  eval.rl.task_digits = 1;
  eval.rl.problems = 10;  // single-digit addition holds out about 10 of its 100 problems
  eval.rl.max_new_tokens = 4;
  r.stages.push_back(eval);
  return r;
}

TEST(RlStages, RunRecipeChainsPretrainRewardModelAndDpoAndReportsHeldOutAccuracy) {
  const fs::path dir = fs::temp_directory_path() / "moerl-rl-stages-test";
  fs::remove_all(dir);
  fs::create_directories(dir);
  const test::RestoreThreads restore;
  const Recipe recipe = flow_recipe(dir);
  const auto summary = run_recipe(recipe);
  ASSERT_TRUE(summary.contains("rm_heldout_accuracy")) << summary.dump(2);
  const double acc = summary["rm_heldout_accuracy"].get<double>();
  EXPECT_GE(acc, 0.0);
  EXPECT_LE(acc, 1.0);
  ASSERT_EQ(summary["stages"].size(), 5u);
  EXPECT_EQ(summary["stages"][1]["kind"], "reward_model");
  EXPECT_GT(summary["stages"][1]["rm_heldout_pairs"].get<int64_t>(), 0);
  EXPECT_EQ(summary["stages"][2]["kind"], "dpo");
  EXPECT_EQ(summary["stages"][3]["algorithm"], "grpo");
  ASSERT_TRUE(summary.contains("kl_to_reference")) << summary.dump(2);
  EXPECT_GE(summary["kl_to_reference"].get<double>(), 0.0);  // k3 >= 0
  // eval_task after rlhf: the accuracy of the RL policy, also at the top of the summary.
  ASSERT_TRUE(summary.contains("task_accuracy_rlhf")) << summary.dump(2);
  EXPECT_GE(summary["task_accuracy_rlhf"].get<double>(), 0.0);
  EXPECT_LE(summary["task_accuracy_rlhf"].get<double>(), 1.0);
  EXPECT_GT(summary["stages"][4]["problems"].get<int64_t>(), 0);
  EXPECT_FALSE(summary["stages"][4].contains("top_level"));
  // The pairs the stage trained on are in the run folder, in the feedback export's format.
  const auto pairs = read_preferences(recipe.out / "preferences" / "rm.jsonl");
  EXPECT_GT(pairs.size(), 100u);
  // Machine-judged held-out pairs ask the task's held-out problems: no held-out prompt is a training prompt.
  const auto held = read_preferences(recipe.out / "preferences" / "rm-heldout.jsonl");
  EXPECT_EQ(static_cast<int64_t>(held.size()), summary["stages"][1]["rm_heldout_pairs"].get<int64_t>());
  for (const auto& h : held)
    for (const auto& p : pairs) ASSERT_NE(h.prompt, p.prompt);
  // The reward model folder loads as a reward model.
  EXPECT_NO_THROW(RewardModel::load(recipe.out / "rm"));
  EXPECT_TRUE(fs::exists(recipe.out / "dpo" / "model.safetensors"));
  // The HTML report: self-contained, a chart per curve, the summary table.
  std::ifstream html_in(recipe.out / "report.html");
  const std::string html((std::istreambuf_iterator<char>(html_in)), std::istreambuf_iterator<char>());
  EXPECT_NE(html.find("<h2>rm</h2>"), std::string::npos);
  EXPECT_NE(html.find("heldout_accuracy</text>"), std::string::npos);  // the reward model's held-out curve
  EXPECT_NE(html.find("<polyline"), std::string::npos);
  EXPECT_NE(html.find("RM held-out accuracy"), std::string::npos);
  EXPECT_EQ(html.find("<script"), std::string::npos);
  EXPECT_EQ(html.find("src="), std::string::npos);
  EXPECT_EQ(html.find("href="), std::string::npos);
  // A second run finds every stage finished and reports the same accuracy.
  const auto again = run_recipe(recipe);
  EXPECT_EQ(again["rm_heldout_accuracy"].get<double>(), acc);
  fs::remove_all(dir);
}

TEST(RlStages, PpoIsSelectableForTheRlhfStage) {
  const fs::path dir = fs::temp_directory_path() / "moerl-rl-stages-ppo";
  fs::remove_all(dir);
  fs::create_directories(dir);
  Recipe recipe = flow_recipe(dir);
  StageSpec rl = recipe.stages[3];
  rl.rl.algorithm = "ppo";
  rl.rl.reward = "checker";  // no reward_model stage in this recipe
  rl.steps = 2;
  recipe.stages = {recipe.stages[0], rl};
  const test::RestoreThreads restore;
  const auto summary = run_recipe(recipe);
  ASSERT_EQ(summary["stages"].size(), 2u);
  EXPECT_EQ(summary["stages"][1]["algorithm"], "ppo");
  EXPECT_TRUE(summary["stages"][1].contains("reward"));
  EXPECT_TRUE(summary.contains("kl_to_reference"));
  EXPECT_TRUE(fs::exists(recipe.out / "rl" / "model.safetensors"));
  fs::remove_all(dir);
}

}  // namespace
}  // namespace moerl
