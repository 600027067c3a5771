// The RLHF stage kinds of a recipe, run on the CPU after pretraining/SFT in the same `moerl run`:
//   task_sft      SFT on the addition task's generated training problems (rl_collect.hpp)
//   preferences   pairs sampled from the policy, judged through the feedback endpoint's HTTP API (rl_collect.hpp)
//   reward_model  preference pairs (a preferences stage's comparisons read back from its store, stage `data:`
//                 JSONL, or machine-judged pairs of the addition task written
//                 to <out>/preferences/<stage>.jsonl) -> RewardModel initialised from the current policy -> Bradley–
//                 Terry training -> <stage>/ (config.json, model.safetensors, result.json)
//   dpo           the same pairs -> the policy trained in place by DPO against its frozen starting weights
//   eval_task     greedy answers to the task's held-out problems, exact match -> task_accuracy (and at the top
//                 of summary.json task_accuracy_<kind of the last stage that trained the policy>: _sft, _rlhf)
//   rlhf          GRPO (default) or PPO on the task's training prompts against the frozen starting policy, rewarded
//                 by the reward model's score (reward: checker for the exact checker) -> reward, kl_to_reference
#pragma once
#include <filesystem>

#include <nlohmann/json.hpp>

#include "runtime/data/tokenizer.hpp"
#include "runtime/model/model.hpp"
#include "runtime/recipe/recipe.hpp"
#include "runtime/train/metrics.hpp"

namespace moerl {

// Runs `stage` (a kind is_rl_stage_kind accepts) with `policy`, the model the earlier stages trained, in place.
// `dir` is the stage's folder; a stage that finished there before (result.json) is loaded and skipped. Returns
// the stage's summary: kind, steps, losses, wall_s, and for reward_model rm_train_accuracy and
// rm_heldout_accuracy (pairwise, on the held-out pairs: see RlStageSpec::heldout_every); "top_level" holds fields for the top of
// summary.json (run_recipe moves them there).
nlohmann::json run_rl_stage(const Recipe& recipe, const StageSpec& stage, Model& policy, const Tokenizer& tokenizer,
                            MetricsLog& metrics, const std::filesystem::path& dir);

}  // namespace moerl
