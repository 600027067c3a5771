// The rlhf stage kind of a recipe (rl_stages.hpp lists the others): GRPO (default) or PPO on the addition
// task's training prompts against the frozen starting policy, rewarded by an earlier reward_model stage's
// score (`reward: reward_model`) or the exact checker (`reward: checker`). Called from run_rl_stage.
#pragma once
#include <filesystem>

#include <nlohmann/json.hpp>

#include "runtime/data/tokenizer.hpp"
#include "runtime/model/model.hpp"
#include "runtime/recipe/recipe.hpp"
#include "runtime/train/metrics.hpp"

namespace moerl {

// Trains `policy` in place for stage.steps RL steps, writes the checkpoint to `dir` and returns the stage's
// summary: algorithm, reward, reward_mean, reward_source, sampled_accuracy, kl_to_reference, wall_s, and
// "top_level" {kl_to_reference}.
nlohmann::json run_rlhf(const Recipe& recipe, const StageSpec& stage, Model& policy, const Tokenizer& tokenizer,
                        MetricsLog& metrics, const std::filesystem::path& dir);

}  // namespace moerl
