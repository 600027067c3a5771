#include "runtime/recipe/rl_stage.hpp"

#include "runtime/recipe/yaml_section.hpp"

namespace moerl {

bool is_rl_stage_kind(const std::string& kind) {
  return kind == "task_sft" || kind == "preferences" || kind == "reward_model" || kind == "dpo" || kind == "rlhf" ||
         kind == "eval_task";
}

RlStageSpec read_rl_stage(YamlSection& s, const std::string& kind, const std::set<std::string>& earlier,
                          const std::set<std::string>& earlier_reward_models) {
  RlStageSpec r;
  r.from = s.get<std::string>("from", r.from);
  if (r.from.empty() && earlier.empty())
    s.fail("kind", "a " + kind + " stage starts from a policy: it needs an earlier stage (pretrain or sft)");
  if (!r.from.empty() && !earlier.count(r.from))
    s.fail("from", "\"" + r.from + "\" is not the name of an earlier stage");
  r.task_digits = s.get<int>("task_digits", r.task_digits);
  if (r.task_digits < 1 || r.task_digits > 4) s.fail("task_digits", "expected 1..4");
  r.max_new_tokens = s.get<int64_t>("max_new_tokens", r.max_new_tokens);
  if (r.max_new_tokens < 1) s.fail("max_new_tokens", "expected a positive integer");
  if (kind == "reward_model" || kind == "dpo" || kind == "preferences") {
    r.pairs = s.get<int64_t>("pairs", r.pairs);
    r.heldout_every = s.get<int64_t>("heldout_every", r.heldout_every);
    if (r.pairs < 2) s.fail("pairs", "expected an integer >= 2");
    if (r.heldout_every < 2) s.fail("heldout_every", "expected an integer >= 2");
  }
  if (kind == "reward_model" || kind == "dpo") {
    r.preferences = s.get<std::string>("preferences", r.preferences);
    if (!r.preferences.empty() && !earlier.count(r.preferences))
      s.fail("preferences", "\"" + r.preferences + "\" is not the name of an earlier stage");
    if (s.has("data") && !r.preferences.empty()) s.fail("preferences", "give data: or preferences:, not both");
  }
  if (kind == "preferences") {
    r.annotator = s.get<std::string>("annotator", r.annotator);
    if (r.annotator != "scripted" && r.annotator != "human")
      s.fail("annotator", "expected scripted or human; got \"" + r.annotator + "\"");
    r.temperature = s.get<double>("temperature", r.temperature);
    if (!(r.temperature > 0)) s.fail("temperature", "expected a positive number");
  }
  if (kind == "dpo") {
    r.beta = s.get<double>("beta", r.beta);
    if (!(r.beta > 0)) s.fail("beta", "expected a positive number");
  }
  if (kind == "rlhf") {
    r.algorithm = s.get<std::string>("algorithm", r.algorithm);
    if (r.algorithm != "grpo" && r.algorithm != "ppo")
      s.fail("algorithm", "expected grpo or ppo; got \"" + r.algorithm + "\"");
    r.reward_model = s.get<std::string>("reward_model", r.reward_model);
    r.reward = s.get<std::string>("reward", r.reward);
    if (r.reward != "reward_model" && r.reward != "checker")
      s.fail("reward", "expected reward_model or checker; got \"" + r.reward + "\"");
    if (r.reward_model.empty() && earlier_reward_models.empty() && r.reward == "reward_model")
      s.fail("reward_model", "an rlhf stage needs an earlier reward_model stage to score its responses");
    if (!r.reward_model.empty() && !earlier_reward_models.count(r.reward_model))
      s.fail("reward_model", "\"" + r.reward_model + "\" is not an earlier stage of kind reward_model");
    r.group_size = s.get<int64_t>("group_size", r.group_size);
    r.kl_coef = s.get<double>("kl_coef", r.kl_coef);
    r.clip = s.get<double>("clip", r.clip);
    r.temperature = s.get<double>("temperature", r.temperature);
    r.max_staleness = s.get<int64_t>("max_staleness", r.max_staleness);
    if (r.max_staleness < 0) s.fail("max_staleness", "expected an integer >= 0 (0: synchronous rollouts)");
    if (r.max_staleness > 0 && r.algorithm != "grpo")
      s.fail("max_staleness", "asynchronous rollouts need algorithm grpo (PPO's critic and GAE are on-policy here)");
    if (r.group_size < 2) s.fail("group_size", "expected an integer >= 2 (a group's advantages need two samples)");
    if (r.kl_coef < 0) s.fail("kl_coef", "expected >= 0");
    if (!(r.clip > 0 && r.clip < 1)) s.fail("clip", "expected a value in (0, 1)");
    if (!(r.temperature > 0)) s.fail("temperature", "expected a positive number");
  }
  if (kind == "eval_task") {
    r.problems = s.get<int64_t>("problems", r.problems);
    if (r.problems < 1) s.fail("problems", "expected a positive integer");
  }
  return r;
}

}  // namespace moerl
