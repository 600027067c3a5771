// The fields of a recipe's RLHF stages, beside the common ones of StageSpec (steps, batch, optimizer, ...):
//   task_sft      supervised fine-tuning on the task's generated training problems (answer + eos scored)
//   preferences   two sampled responses per prompt from the current policy, queued in a feedback store and judged
//                 through the feedback endpoint's HTTP API (a scripted annotator by default, or people)
//   reward_model  a scalar-head copy of a policy trained on preference pairs (Bradley–Terry)
//   dpo           direct preference optimisation of the policy on preference pairs (offline)
//   rlhf          online RL of the policy against the reward model: algorithm grpo (default) or ppo
//   eval_task     exact-match accuracy of the policy on the task's held-out problems (no training)
// Preference pairs come from `data:` (HF chosen/rejected JSONL: the feedback store's export, or any file) or,
// without it, from the comparisons of a `preferences` stage (the last one before, or the one named), or else are
// made by machine judgement from the addition task (runtime/rl/preferences.hpp).
#pragma once
#include <cstdint>
#include <set>
#include <string>

namespace moerl {

class YamlSection;

struct RlStageSpec {
  std::string from;             // the earlier stage whose checkpoint starts this one; "" = the stage before
  int task_digits = 2;          // operand digits of the addition task (runtime/rl/task.hpp), 1..4
  // reward_model, dpo, preferences
  int64_t pairs = 2000;         // machine-judged pairs to make when the stage has no `data:` file; preferences:
                                // prompts to sample a pair for (judged pairs with a tie carry no preference)
  std::string preferences;      // reward_model, dpo: the preferences stage whose comparisons train it; "" = the
                                // last one before (none: data: or machine-judged pairs)
  std::string annotator = "scripted";  // preferences: scripted (judges with the exact checker over HTTP) | human
                                       // (waits until people have judged every pair on the web page)
  int64_t heldout_every = 10;   // 1/N of the pairs held out (pairwise accuracy is measured on those): every Nth
                                // pair of a data file; machine-judged pairs: pairs/N on the task's held-out problems
  double beta = 0.1;            // dpo: β, the strength of the implicit KL to the reference policy
  // rlhf
  std::string algorithm = "grpo";   // grpo | ppo
  std::string reward_model;     // the reward_model stage that scores responses; "" = the last one before
  std::string reward = "reward_model";  // reward_model (its score, RLHF) | checker (the exact checker: a
                                        // verifiable-reward baseline); the checker evaluates either way
  int64_t group_size = 8;       // responses per prompt (GRPO's group; PPO samples this many too)
  double kl_coef = 0.05;        // weight of the KL penalty to the reference (the starting policy)
  double clip = 0.2;            // PPO/GRPO ratio clip ε
  double temperature = 1.0;     // sampling temperature of rollouts
  int64_t max_staleness = 0;    // 0: synchronous rollouts (generate, then update); >= 1 (grpo): the next batch is
                                // generated while the update runs, so rollouts are one policy version old; the
                                // update weighs them by the importance ratio to their behaviour log-probs and
                                // drops groups more than max_staleness versions old
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
