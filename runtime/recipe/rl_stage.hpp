// The fields of a recipe's RLHF stages, beside the common ones of StageSpec (steps, batch, optimizer, ...):
//   reward_model  a scalar-head copy of a policy trained on preference pairs (Bradley–Terry)
//   dpo           direct preference optimisation of the policy on preference pairs (offline)
//   rlhf          online RL of the policy against the reward model: algorithm grpo (default) or ppo
//   eval_task     exact-match accuracy of the policy on the task's held-out problems (no training)
// Preference pairs come from `data:` (HF chosen/rejected JSONL: the feedback store's export, or any file) or,
// without it, are made by machine judgement from the addition task (runtime/rl/preferences.hpp).
#pragma once
#include <cstdint>
#include <set>
#include <string>

namespace moerl {

class YamlSection;

struct RlStageSpec {
  std::string from;             // the earlier stage whose checkpoint starts this one; "" = the stage before
  int task_digits = 2;          // operand digits of the addition task (runtime/rl/task.hpp), 1..4
  // reward_model, dpo
  int64_t pairs = 2000;         // machine-judged pairs to make when the stage has no `data:` file
  int64_t heldout_every = 10;   // 1/N of the pairs held out (pairwise accuracy is measured on those): every Nth
                                // pair of a data file; machine-judged pairs: pairs/N on the task's held-out problems
  double beta = 0.1;            // dpo: β, the strength of the implicit KL to the reference policy
  // rlhf
  std::string algorithm = "grpo";   // grpo | ppo
  std::string reward_model;     // the reward_model stage that scores responses; "" = the last one before
  int64_t group_size = 8;       // responses per prompt (GRPO's group; PPO samples this many too)
  double kl_coef = 0.05;        // weight of the KL penalty to the reference (the starting policy)
  double clip = 0.2;            // PPO/GRPO ratio clip ε
  double temperature = 1.0;     // sampling temperature of rollouts
  int64_t max_new_tokens = 8;   // response length cap (rollouts and eval_task)
  // eval_task
  int64_t problems = 200;       // held-out problems evaluated
};

// True for the kinds this file describes.
bool is_rl_stage_kind(const std::string& kind);

// Reads the fields `kind` allows from the stage's mapping (refuse_unknown() afterwards rejects the others) and
// checks them; `earlier` holds the names of the stages before this one, kinds in `earlier_kinds` by name.
// Errors name file:line: stages[i].field.
RlStageSpec read_rl_stage(YamlSection& s, const std::string& kind, const std::set<std::string>& earlier,
                          const std::set<std::string>& earlier_reward_models);

}  // namespace moerl
