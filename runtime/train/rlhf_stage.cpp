#include "runtime/util/clock.hpp"
#include "runtime/train/rlhf_stage.hpp"

#include <chrono>
#include <cstdio>
#include <future>
#include <memory>
#include <string>

#include "runtime/error.hpp"
#include "runtime/rl/preferences.hpp"
#include "runtime/rl/reward_model.hpp"
#include "runtime/rl/task.hpp"
#include "runtime/rl/task_loop.hpp"
#include "runtime/safetensors.hpp"
#include "runtime/train/checkpoint.hpp"
#include "runtime/train/rl_collect.hpp"
#include "runtime/train/step_policy.hpp"
#include "runtime/util/progress.hpp"
#include "runtime/util/threads.hpp"

namespace moerl {
namespace fs = std::filesystem;
namespace {


RlhfServicesFactory& installed_factory() {
  static RlhfServicesFactory factory;
  return factory;
}

// Request ids: 1 + the prompt's index within the step + the step times a bound on prompts per step, so every
// request of a stage has its own id and (rl::rollout_stream) its own streams.
constexpr uint64_t kRequestsPerStep = uint64_t{1} << 20;
uint64_t request_id(int64_t step, size_t prompt) {
  return static_cast<uint64_t>(step) * kRequestsPerStep + prompt + 1;
}

class InProcessServices final : public RlhfServices {
 public:
  explicit InProcessServices(const RlhfSetup& setup) : precision_(setup.precision) {
    if (!setup.reward_model.empty()) reward_ = RewardModel::load(setup.reward_model);
  }

  void publish_weights(Model& policy, uint64_t version, int64_t step) override {
    policy_ = &policy;
    version_ = msg::PolicyVersion{version, static_cast<uint64_t>(step)};
  }

  std::vector<msg::Rollout> generate(const std::vector<msg::GenerationRequest>& requests, int64_t) override {
    require(policy_ != nullptr, "rlhf: generate before any weights were published");
    std::vector<msg::Rollout> out;
    for (const auto& req : requests) {
      require(req.policy_version.version <= version_.version,
              "rlhf: a request for policy version " + std::to_string(req.policy_version.version) +
                  ", newer than the weights held (" + std::to_string(version_.version) + ")");
      std::vector<uint64_t> streams;
      for (uint32_t k = 0; k < req.samples; ++k) streams.push_back(rl::rollout_stream(req.request_id, k));
      const std::vector<Generation> gens =
          generate_samples(*policy_, req.prompt_ids, req.sampling, streams, precision_);
      for (uint32_t k = 0; k < req.samples; ++k)
        out.push_back(msg::Rollout{req.request_id, k, req.prompt_ids, gens[k].ids, gens[k].log_probs, version_,
                                   gens[k].finish});
    }
    return out;
  }

  // One sequence at a time, as the reward-model actor scores them (a batch would pad them: other rounding).
  std::vector<float> score(const std::vector<msg::Rollout>& sequences, int64_t) override {
    require(reward_ != nullptr, "rlhf: score without a reward model");
    std::vector<float> out;
    for (const auto& r : sequences) out.push_back(reward_->score_rollout(r.prompt_ids, r.response_ids, precision_));
    return out;
  }

 private:
  Precision precision_;
  std::unique_ptr<RewardModel> reward_;
  Model* policy_ = nullptr;
  msg::PolicyVersion version_;
};

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

}  // namespace

// Online RL of the policy on the task's training prompts: GRPO (default) or PPO (task_loop's updates), the frozen
// starting policy as the KL reference. The reward is the trained reward model's score of bos + prompt + response
// text + eos (as its preference pairs were scored: preference_tokens, the text tokenized again); `reward:
// checker` uses the exact checker instead. The checker only monitors (checker_accuracy per step) and evaluates
// (eval_task) otherwise.
nlohmann::json run_rlhf(const Recipe& recipe, const StageSpec& stage, Model& policy, const Tokenizer& tokenizer,
                        MetricsLog& metrics, const fs::path& dir) {
  const auto t0 = std::chrono::steady_clock::now();
  start_policy(recipe, stage, policy);
  const rl::AdditionTask task{stage.rl.task_digits};
  const rl::TaskCodec codec = tokenizer_codec(tokenizer);
  const bool ppo_algorithm = stage.rl.algorithm == "ppo";
  const auto group = static_cast<uint32_t>(stage.rl.group_size);
  require(stage.rl.group_size >= 1 && stage.rl.group_size <= 1024 &&
              static_cast<uint64_t>(stage.batch) < kRequestsPerStep,
          stage.name + ": group_size must be in [1, 1024] and batch below " + std::to_string(kRequestsPerStep) +
              " (each sample draws from its own stream)");
  RlhfSetup setup;
  setup.stage = stage.name;
  setup.work_dir = recipe.out / "rlhf-services" / stage.name;
  setup.replay_dir = recipe.out / "replay" / stage.name;  // beside the stage folder, which its checkpoint replaces
  setup.precision = recipe.precision;
  setup.threads = resolve_threads(recipe.threads);  // what run_recipe set for this thread
  setup.metrics = &metrics;
  std::string reward_source = "exact checker (verifiable reward)";
  if (stage.rl.reward == "reward_model") {
    const std::string rm_stage = reward_model_stage(recipe, stage);
    setup.reward_model = recipe.out / rm_stage;
    reward_source = "reward model " + rm_stage;
  }
  const std::unique_ptr<RlhfServices> services =
      installed_factory() ? installed_factory()(setup) : in_process_rlhf_services(setup);
  const TextEncoder encode = [&tokenizer](std::string_view text) { return tokenizer.encode(text); };
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
  // Prompts per step: the stage's batch, each answered group_size times (GRPO's group; PPO's samples).
  const auto problems = rl::training_problems(task, recipe.seed + 103, static_cast<size_t>(stage.steps * stage.batch));
  ProgressBar bar(stage.name, stage.steps, "tok");
  int64_t tokens = 0, stale_groups = 0;
  double reward_sum = 0, kl_last = 0, reward_last = 0, checker_last = 0;
  uint64_t version = 0;  // updates applied
  auto requests_for = [&](int64_t step, uint64_t v) {
    std::vector<msg::GenerationRequest> requests;
    for (int64_t i = 0; i < stage.batch; ++i)
      requests.push_back(msg::GenerationRequest{request_id(step, static_cast<size_t>(i)),
                                                codec.prompt_ids(problems[static_cast<size_t>(step * stage.batch + i)]),
                                                sampling, msg::PolicyVersion{v, static_cast<uint64_t>(step)}, group});
    return requests;
  };
  // A step's rollouts (made by policy version v) checked, scored and recorded: the batch the update learns from.
  auto prepare = [&](int64_t step, const std::vector<msg::GenerationRequest>& requests,
                     const std::vector<msg::Rollout>& rollouts, uint64_t v) {
    const std::span<const rl::Problem> batch(problems.data() + step * stage.batch, static_cast<size_t>(stage.batch));
    require(rollouts.size() == batch.size() * group, stage.name + ": step " + std::to_string(step + 1) + ": " +
                                                         std::to_string(rollouts.size()) + " rollouts for " +
                                                         std::to_string(batch.size() * group) + " samples");
    rl::RlBatch b;
    std::vector<msg::Rollout> scored;
    for (size_t n = 0; n < rollouts.size(); ++n) {
      const msg::Rollout& r = rollouts[n];
      const msg::GenerationRequest& req = requests[n / group];
      require(r.request_id == req.request_id && r.sample_index == n % group && r.policy_version.version == v,
              stage.name + ": step " + std::to_string(step + 1) + ": rollout " + std::to_string(n) + " is request " +
                  std::to_string(r.request_id) + " sample " + std::to_string(r.sample_index) + " of policy version " +
                  std::to_string(r.policy_version.version) + ", expected request " + std::to_string(req.request_id) +
                  " sample " + std::to_string(n % group) + " of version " + std::to_string(v));
      const rl::Problem& p = batch[n / group];
      b.prompts.push_back(req.prompt_ids);
      b.responses.push_back(r.response_ids);
      b.correct.push_back(codec.check(p, r.response_ids) ? 1.0f : 0.0f);
      b.tokens += static_cast<int64_t>(r.response_ids.size());
      if (!setup.reward_model.empty()) {
        // The sequence the reward model was trained on: bos + prompt, then the response text tokenized again + eos.
        const ScoredTokens seq = preference_tokens(encode, p.prompt, judged_text(tokenizer, r.response_ids),
                                                   tokenizer.bos_id(), tokenizer.eos_id());
        msg::Rollout sc = r;
        sc.prompt_ids.assign(seq.ids.begin(), seq.ids.begin() + seq.response_start);
        sc.response_ids.assign(seq.ids.begin() + seq.response_start, seq.ids.end());
        sc.log_probs.assign(sc.response_ids.size(), 0.0f);
        scored.push_back(std::move(sc));
      }
    }
    b.rewards = setup.reward_model.empty() ? b.correct : services->score(scored, step);
    require(b.rewards.size() == b.responses.size(), stage.name + ": the reward model returned " +
                                                        std::to_string(b.rewards.size()) + " rewards for " +
                                                        std::to_string(b.responses.size()) + " responses");
    services->record(step, rollouts, b.rewards);
    return b;
  };
  // Asynchronous rollouts (max_staleness >= 1): generation reads a snapshot of the policy, so the next batch can
  // be generated while the update changes the policy; every batch is then one version old.
  const bool async = stage.rl.max_staleness > 0;
  std::unique_ptr<Model> snapshot;
  if (async) {
    snapshot = std::make_unique<Model>(policy.config());
    snapshot->load_weights(weights_of(policy));
  }
  Model& generator = async ? *snapshot : policy;
  services->publish_weights(generator, version, 0);
  std::vector<msg::GenerationRequest> requests = requests_for(0, version);
  auto tg = std::chrono::steady_clock::now();
  std::vector<msg::Rollout> rollouts = services->generate(requests, 0);
  uint64_t rollout_version = version;
  for (int64_t step = 0; step < stage.steps; ++step) {
    const rl::RlBatch b = prepare(step, requests, rollouts, rollout_version);
    const uint64_t learned_version = rollout_version;
    const double generate_seconds = seconds_since(tg);
    const bool more = step + 1 < stage.steps;
    std::vector<msg::GenerationRequest> next_requests;
    std::future<std::vector<msg::Rollout>> next;
    if (async && more) {  // the services are used by this thread only while no generation is in flight
      next_requests = requests_for(step + 1, version);
      next = std::async(std::launch::async, [&services, &next_requests, step] {
        return services->generate(next_requests, step + 1);
      });
    }
    rl::RlStepStats st;
    if (ppo_algorithm) {
      st = rl::ppo_learn(policy, reference, critic, opt, critic_opt, b, ppo, step, 1, recipe.precision, codec.pad_id);
    } else if (!async) {
      st = rl::grpo_learn(policy, reference, opt, b, grpo, step, 1, recipe.precision, codec.pad_id);
    } else {
      rl::RolloutGroups groups{b.prompts, b.responses, {}, b.rewards,
                               std::vector<uint64_t>(b.responses.size(), rollout_version)};
      for (const auto& r : rollouts) groups.behaviour_log_probs.push_back(r.log_probs);
      int64_t dropped = 0;
      st = rl::grpo_update(policy, reference, opt, groups, grpo, version, static_cast<uint64_t>(stage.rl.max_staleness),
                           step, &dropped, recipe.precision, codec.pad_id);
      stale_groups += dropped;
      st.generated_tokens = b.tokens;
      st.checker_accuracy = 0;
      for (float c : b.correct) st.checker_accuracy += c / static_cast<double>(b.correct.size());
    }
    st.generate_seconds = generate_seconds;
    if (stage.bias_gamma > 0) policy.update_router_bias(stage.bias_gamma);
    ++version;
    if (more) {
      tg = std::chrono::steady_clock::now();
      if (async) {
        rollouts = next.get();
        rollout_version = version - 1;
        requests = std::move(next_requests);
        snapshot->load_weights(weights_of(policy));
        services->publish_weights(*snapshot, version, step + 1);
      } else {
        services->publish_weights(policy, version, step + 1);
        requests = requests_for(step + 1, version);
        rollouts = services->generate(requests, step + 1);
        rollout_version = version;
      }
    }
    tokens += st.generated_tokens;
    reward_sum += st.reward_mean;
    reward_last = st.reward_mean;
    checker_last = st.checker_accuracy;
    kl_last = st.policy.kl;
    nlohmann::json m = {{"stage", stage.name}, {"step", step + 1},     {"loss", st.policy.loss},
                        {"reward", st.reward_mean}, {"kl", st.policy.kl}, {"clip_fraction", st.policy.clip_fraction},
                        {"checker_accuracy", st.checker_accuracy}};
    if (ppo_algorithm) m["value_loss"] = st.value_loss;
    if (async) m["rollout_version"] = learned_version, m["policy_version"] = version - 1;  // learned from, updated
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
          {"max_staleness", stage.rl.max_staleness},
          {"stale_groups_dropped", stale_groups},
          {"wall_s", seconds_since(t0)},
          {"checkpoint", dir.string()},
          {"top_level", {{"kl_to_reference", kl_last}}}};
}

std::unique_ptr<RlhfServices> in_process_rlhf_services(const RlhfSetup& setup) {
  return std::make_unique<InProcessServices>(setup);
}

ScopedRlhfServices::ScopedRlhfServices(RlhfServicesFactory factory) : previous_(std::move(installed_factory())) {
  installed_factory() = std::move(factory);
}

ScopedRlhfServices::~ScopedRlhfServices() { installed_factory() = std::move(previous_); }

}  // namespace moerl
