#include "runtime/train/rlhf_stage.hpp"

#include <chrono>
#include <cstdio>
#include <memory>

#include "runtime/error.hpp"
#include "runtime/rl/preferences.hpp"
#include "runtime/rl/reward_model.hpp"
#include "runtime/rl/task.hpp"
#include "runtime/rl/task_loop.hpp"
#include "runtime/safetensors.hpp"
#include "runtime/train/checkpoint.hpp"
#include "runtime/train/rl_collect.hpp"
#include "runtime/util/progress.hpp"

namespace moerl {
namespace fs = std::filesystem;
namespace {

SafeTensors weights_of(const Model& model) {
  SafeTensors st;
  st.source = "the policy of the previous stage";
  for (const auto& [name, p] : model.params().all()) st.tensors.emplace(name, p.value.clone());
  return st;
}

// The starting policy: `from`'s checkpoint, or the model in memory (the stage before).
void start_policy(const Recipe& recipe, const StageSpec& stage, Model& policy) {
  if (stage.rl.from.empty()) return;
  const auto st = read_safetensors(recipe.out / stage.rl.from / "model.safetensors");
  policy.load_weights(st);
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The reward_model stage that scores an rlhf stage's responses: the one it names, else the last before it.
std::string reward_model_stage(const Recipe& recipe, const StageSpec& stage) {
  std::string found;
  for (const auto& b : recipe.stages) {
    if (b.name == stage.name) break;
    if (b.kind == "reward_model" && (stage.rl.reward_model.empty() || b.name == stage.rl.reward_model)) found = b.name;
  }
  require(!found.empty(), stage.name + ": reward: reward_model needs an earlier reward_model stage");
  return found;
}

// Online RL of the policy on the task's training prompts: GRPO (default) or PPO (task_loop's steps), the frozen
// starting policy as the KL reference. The reward is the trained reward model's score of bos + prompt + response
// text + eos (as its preference pairs were scored); `reward: checker` uses the exact checker instead. The checker
// only monitors (checker_accuracy per step) and evaluates (eval_task) otherwise.
}  // namespace

nlohmann::json run_rlhf(const Recipe& recipe, const StageSpec& stage, Model& policy, const Tokenizer& tokenizer,
                        MetricsLog& metrics, const fs::path& dir) {
  const auto t0 = std::chrono::steady_clock::now();
  start_policy(recipe, stage, policy);
  const rl::AdditionTask task{stage.rl.task_digits};
  rl::TaskCodec codec = tokenizer_codec(tokenizer);
  std::unique_ptr<RewardModel> rm;
  std::string reward_source = "exact checker (verifiable reward)";
  if (stage.rl.reward == "reward_model") {
    const std::string rm_stage = reward_model_stage(recipe, stage);
    rm = RewardModel::load(recipe.out / rm_stage);
    reward_source = "reward model " + rm_stage;
    const TextEncoder encode = [&tokenizer](std::string_view text) { return tokenizer.encode(text); };
    codec.reward = [&, encode](const std::vector<const rl::Problem*>& problems,
                               const std::vector<std::vector<int32_t>>& responses) {
      std::vector<std::vector<int32_t>> seqs;
      for (size_t i = 0; i < responses.size(); ++i)
        seqs.push_back(preference_tokens(encode, problems[i]->prompt, judged_text(tokenizer, responses[i]),
                                         tokenizer.bos_id(), tokenizer.eos_id()));
      return rm->score(seqs, recipe.precision);
    };
  }
  Model reference(policy.config());
  reference.load_weights(weights_of(policy));
  AdamWConfig oc = stage.optimizer;
  oc.total_steps = stage.steps;
  AdamW opt(policy.params(), oc);
  rl::GrpoConfig grpo;
  grpo.group_size = stage.rl.group_size;
  grpo.clip_eps = static_cast<float>(stage.rl.clip);
  grpo.kl_coef = static_cast<float>(stage.rl.kl_coef);
  rl::PpoConfig ppo;
  ppo.clip_eps = static_cast<float>(stage.rl.clip);
  ppo.kl_coef = static_cast<float>(stage.rl.kl_coef);
  rl::ValueHead critic(policy.config().hidden_size);
  AdamWConfig critic_oc = oc;
  critic_oc.weight_decay = 0.0;
  AdamW critic_opt(critic.params(), critic_oc);
  msg::SamplingParams sampling = rl::task_sampling(task, recipe.seed + 101, tokenizer.eos_id());
  sampling.temperature = static_cast<float>(stage.rl.temperature);
  sampling.max_new_tokens = static_cast<uint32_t>(stage.rl.max_new_tokens);
  // Prompts per step: the stage's batch (GRPO: each answered group_size times).
  const auto problems = rl::training_problems(task, recipe.seed + 103, static_cast<size_t>(stage.steps * stage.batch));
  ProgressBar bar(stage.name, stage.steps, "tok");
  int64_t tokens = 0;
  double reward_sum = 0, kl_last = 0, reward_last = 0, checker_last = 0;
  for (int64_t step = 0; step < stage.steps; ++step) {
    const std::span<const rl::Problem> batch(problems.data() + step * stage.batch, static_cast<size_t>(stage.batch));
    const rl::RlStepStats st =
        stage.rl.algorithm == "ppo"
            ? rl::ppo_step(policy, reference, critic, opt, critic_opt, task, batch, stage.rl.group_size, ppo,
                           sampling, step, 1, recipe.precision, codec)
            : rl::grpo_step(policy, reference, opt, task, batch, grpo, sampling, step, 1, recipe.precision, codec);
    if (stage.bias_gamma > 0) policy.update_router_bias(stage.bias_gamma);
    tokens += st.generated_tokens;
    reward_sum += st.reward_mean;
    reward_last = st.reward_mean;
    checker_last = st.checker_accuracy;
    kl_last = st.policy.kl;
    nlohmann::json m = {{"stage", stage.name}, {"step", step + 1},     {"loss", st.policy.loss},
                        {"reward", st.reward_mean}, {"kl", st.policy.kl}, {"clip_fraction", st.policy.clip_fraction},
                        {"checker_accuracy", st.checker_accuracy}};
    if (stage.rl.algorithm == "ppo") m["value_loss"] = st.value_loss;
    metrics.write(m);
    char fields[96];
    std::snprintf(fields, sizeof fields, "reward %.3f  acc %.2f  kl %.4f", st.reward_mean, st.checker_accuracy,
                  st.policy.kl);
    bar.update(step + 1, tokens, fields);
  }
  char fields[96];
  std::snprintf(fields, sizeof fields, "reward %.3f  kl %.4f", reward_last, kl_last);
  bar.finish(fields);
  save_checkpoint(dir, policy, &tokenizer, nullptr, nullptr);
  return {{"stage", stage.name},
          {"kind", stage.kind},
          {"algorithm", stage.rl.algorithm},
          {"steps", stage.steps},
          {"reward", reward_last},
          {"reward_mean", reward_sum / static_cast<double>(stage.steps)},
          {"reward_source", reward_source},
          {"sampled_accuracy", checker_last},
          {"kl_to_reference", kl_last},
          {"wall_s", seconds_since(t0)},
          {"checkpoint", dir.string()},
          {"top_level", {{"kl_to_reference", kl_last}}}};
}

}  // namespace moerl
