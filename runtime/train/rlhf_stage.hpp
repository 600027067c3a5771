// The rlhf stage kind of a recipe (rl_stages.hpp lists the others): GRPO (default) or PPO on the addition
// task's training prompts against the frozen starting policy, rewarded by an earlier reward_model stage's
// score (`reward: reward_model`) or the exact checker (`reward: checker`). Called from run_rl_stage.
//
// Each step: the policy's weights (version = updates applied so far) go to the generation service, one
// GenerationRequest per prompt (group_size samples; request id and streams derived from the step and the
// prompt's index, so a retried request gets the same responses) comes back as Rollouts tagged with the
// version that made them, the reward service scores them (reward_model), and the update is applied once, in
// this process (rl::grpo_learn / rl::ppo_learn). The services run in this process (in_process_rlhf_services)
// or as actors (actors/roles/rlhf_actors.hpp: the rollout and reward-model actors, supervised); both give the
// same metrics bit for bit.
// Asynchronous rollouts (`max_staleness: N >= 1`, GRPO): generation reads a snapshot of the policy (published
// after each update), and step s+1's batch is generated on another thread while step s's update runs; its
// rollouts are then one version old, and rl::grpo_update weighs them by the importance ratio to their
// behaviour log-probs, dropping groups more than N versions old (stale_groups_dropped in the summary). Scoring
// and recording stay on the stage's thread while no generation is in flight.
#pragma once
#include <filesystem>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/data/tokenizer.hpp"
#include "runtime/messages/types.hpp"
#include "runtime/model/model.hpp"
#include "runtime/recipe/recipe.hpp"
#include "runtime/train/metrics.hpp"

namespace moerl {

// What the services of one rlhf stage are made from.
struct RlhfSetup {
  std::string stage;                 // the stage's name, for messages
  std::filesystem::path work_dir;    // a folder the services may use (e.g. the starting policy for a respawn)
  std::filesystem::path replay_dir;  // where the stage's rollouts may be recorded (<out>/replay/<stage>, kept)
  std::filesystem::path reward_model;  // the reward_model stage's folder (RewardModel::save); empty: reward: checker
  Precision precision = Precision::FP32;
  int threads = 0;                   // > 0: the CPU thread count for generation and scoring (the recipe's, resolved)
  MetricsLog* metrics = nullptr;     // for events (a restart); may be null
};

// Generation and reward for the rlhf stage; the update stays with the caller. Calls alternate: weights,
// then generate (and score) for one step, then the caller updates the model, then weights again.
class RlhfServices {
 public:
  virtual ~RlhfServices() = default;
  // `policy` after `version` updates (0: the stage's starting policy) at `step`; generation uses this very
  // object (zero-copy) until the next call, and the caller does not change it while generate runs.
  virtual void publish_weights(Model& policy, uint64_t version, int64_t step) = 0;
  // For each request, its `samples` Rollouts in sample order (request-major), sample k drawn with
  // request.sampling and stream rl::rollout_stream(request_id, k), stamped with the version of the weights.
  virtual std::vector<msg::Rollout> generate(const std::vector<msg::GenerationRequest>& requests, int64_t step) = 0;
  // The reward model's score of each sequence prompt_ids + response_ids (eos appended when it does not end
  // in eos), in order. Only with RlhfSetup::reward_model.
  virtual std::vector<float> score(const std::vector<msg::Rollout>& sequences, int64_t step) = 0;
  // Called with each step's rollouts and their rewards before the update: a hook for a replay buffer (none
  // by default).
  virtual void record(int64_t /*step*/, const std::vector<msg::Rollout>& /*rollouts*/,
                      std::span<const float> /*rewards*/) {}
};

using RlhfServicesFactory = std::function<std::unique_ptr<RlhfServices>(const RlhfSetup&)>;

// Generation with rl::generate per request and scoring with RewardModel::score per sequence, in this process.
std::unique_ptr<RlhfServices> in_process_rlhf_services(const RlhfSetup& setup);

// While alive, run_rlhf makes its services with `factory` (e.g. the actors') instead of in_process_rlhf_services.
// Not thread-safe: install it before run_recipe and keep it until run_recipe returns. Nests (the innermost wins).
class ScopedRlhfServices {
 public:
  explicit ScopedRlhfServices(RlhfServicesFactory factory);
  ~ScopedRlhfServices();
  ScopedRlhfServices(const ScopedRlhfServices&) = delete;
  ScopedRlhfServices& operator=(const ScopedRlhfServices&) = delete;

 private:
  RlhfServicesFactory previous_;
};

// Trains `policy` in place for stage.steps RL steps, writes the checkpoint to `dir` and returns the stage's
// summary: algorithm, reward, reward_mean, reward_source, sampled_accuracy, kl_to_reference, wall_s, and
// "top_level" {kl_to_reference}.
nlohmann::json run_rlhf(const Recipe& recipe, const StageSpec& stage, Model& policy, const Tokenizer& tokenizer,
                        MetricsLog& metrics, const std::filesystem::path& dir);

}  // namespace moerl
