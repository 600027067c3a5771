// One step at a time of the quickstart's RL on the verifiable task (runtime/rl/task.hpp): supervised
// fine-tuning on the answers, greedy evaluation by the exact checker, and the policy-gradient steps (GRPO and
// PPO) that generate with the KV cache, reward by the checker, score against a frozen reference and update.
// The recipe stages (runtime/train/run_recipe.cpp) and the tests drive these.
#pragma once
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "kernels/linear.hpp"
#include "runtime/messages/types.hpp"
#include "runtime/model/model.hpp"
#include "runtime/optim/adamw.hpp"
#include "runtime/rl/grpo.hpp"
#include "runtime/rl/ppo.hpp"
#include "runtime/rl/task.hpp"

namespace moerl::rl {

// How problems become token ids and responses are judged: the task's own characters (char_codec(), the default)
// or a run's tokenizer (e.g. bos + tokenizer.encode(p.prompt), and the response decoded up to eos compared with
// p.answer). Generation stops at the sampling's stop ids; pad_id fills scored batches.
// The RL steps' reward is `reward` when set (RLHF: a trained reward model's score of each response) and the
// exact checker's 0/1 otherwise (a verifiable reward); the checker is always what evaluates.
struct TaskCodec {
  using RewardFn = std::function<std::vector<float>(const std::vector<const Problem*>& problems,
                                                    const std::vector<std::vector<int32_t>>& responses)>;
  std::function<std::vector<int32_t>(const Problem&)> prompt_ids;
  std::function<std::vector<int32_t>(const Problem&)> answer_ids;       // SFT target, without eos
  std::function<bool(const Problem&, std::span<const int32_t>)> check;  // the exact checker on response ids
  RewardFn reward;  // one reward per response (responses as generated, eos included when produced); may be empty
  int32_t eos_id = kTaskEos, pad_id = kTaskPad;
};
TaskCodec char_codec();

struct TaskEval {
  int64_t correct = 0, total = 0;
  double accuracy() const { return total ? static_cast<double>(correct) / static_cast<double>(total) : 0.0; }
};
// Greedy decoding (KV cache) of every problem, up to digits + 2 new tokens (the answer and eos), judged by
// check_answer.
TaskEval evaluate_task(Model& model, const AdditionTask& task, std::span<const Problem> problems,
                       Precision precision = Precision::FP32, const TaskCodec& codec = char_codec());

// Mean exact-checker reward of `samples` responses per problem drawn with `sampling` (pass@1 at its temperature):
// on a small held-out set, a finer measure than greedy accuracy.
double sampled_accuracy(Model& model, std::span<const Problem> problems, int64_t samples,
                        const msg::SamplingParams& sampling, Precision precision = Precision::FP32,
                        const TaskCodec& codec = char_codec());

// One SFT step: cross-entropy on the answer and eos of each problem (prompt tokens not scored), mean over
// those tokens; zeroes the gradients, backward, optimizer step `step`. Returns the loss.
double sft_step(Model& model, AdamW& optimizer, std::span<const Problem> problems, int64_t step,
                Precision precision = Precision::FP32, const TaskCodec& codec = char_codec());
// The same loss on `problems` without any update (a held-out SFT loss).
double sft_loss(Model& model, std::span<const Problem> problems, Precision precision = Precision::FP32,
                const TaskCodec& codec = char_codec());

struct RlStepStats {
  double reward_mean = 0;     // mean reward of the step's samples (before the update): codec.reward's or the checker's
  double checker_accuracy = 0;  // fraction of the step's samples the exact checker accepts (monitoring only)
  PolicyLossStats policy;     // of the first update epoch
  double value_loss = 0;      // PPO: the critic's loss in the first epoch
  int64_t generated_tokens = 0;
  double generate_seconds = 0, update_seconds = 0;
};

// The sampling the RL steps use on the task: temperature 1 (log-probs then are the behaviour policy's), the
// answer's length bound, eos as the stop id.
msg::SamplingParams task_sampling(const AdditionTask& task, uint64_t seed, int32_t eos_id = kTaskEos);

// A step's samples, problem-major (the responses to one problem consecutive), made in this process or by the
// rollout actor (runtime/train/rlhf_stage.hpp), with their rewards.
struct RlBatch {
  std::vector<std::vector<int32_t>> prompts, responses;  // responses as generated, eos included when produced
  std::vector<float> rewards;
  std::vector<float> correct;  // the exact checker's 0/1 (monitoring), whatever the reward
  int64_t tokens = 0;          // generated
};

// The stream of sample `sample` of GenerationRequest `request_id`: what the rollout actor draws it from
// (actors/roles/policy_roles.cpp), so a request answered here or there gives the same responses.
inline uint64_t rollout_stream(uint64_t request_id, uint32_t sample) { return request_id * 1025 + sample; }

// GRPO step: config.group_size samples for each problem (streams derived from `step`), group-normalized
// advantages, `epochs` updates of the clipped surrogate with the k3 KL to `reference`.
RlStepStats grpo_step(Model& policy, Model& reference, AdamW& optimizer, const AdditionTask& task,
                      std::span<const Problem> problems, const GrpoConfig& config, const msg::SamplingParams& sampling,
                      int64_t step, int64_t epochs = 1, Precision precision = Precision::FP32,
                      const TaskCodec& codec = char_codec());

// grpo_step's update from a batch sampled elsewhere by the current policy (temperature 1), groups of
// config.group_size: old log-probs recomputed by `policy`, `epochs` updates. reward_mean, checker_accuracy and
// generated_tokens come from the batch. grpo_step is sampling + this, bit for bit.
RlStepStats grpo_learn(Model& policy, Model& reference, AdamW& optimizer, const RlBatch& batch,
                       const GrpoConfig& config, int64_t step, int64_t epochs = 1,
                       Precision precision = Precision::FP32, int32_t pad_id = kTaskPad);

// Rollouts made elsewhere (the asynchronous rollout actor), possibly by an older policy version: groups of
// group_size consecutive responses to one prompt, with the behaviour policy's per-token log-probs (temperature
// 1) and the policy version that produced each.
struct RolloutGroups {
  std::vector<std::vector<int32_t>> prompts, responses;
  std::vector<std::vector<float>> behaviour_log_probs;  // [responses[i].size()] each
  std::vector<float> rewards;
  std::vector<uint64_t> versions;
};
// Off-policy GRPO update: groups with any response older than current_version − max_staleness are dropped
// (the staleness bound); the ratio is taken against the behaviour log-probs (importance-ratio correction,
// clipped; config.is_cap truncates it further). Returns the stats of the groups used; dropped reports how
// many groups were too stale. Nothing is updated when every group is dropped.
RlStepStats grpo_update(Model& policy, Model& reference, AdamW& optimizer, const RolloutGroups& rollouts,
                        const GrpoConfig& config, uint64_t current_version, uint64_t max_staleness, int64_t step,
                        int64_t* dropped = nullptr, Precision precision = Precision::FP32, int32_t pad_id = kTaskPad);

// PPO step: `samples` responses for each problem, rewards with the per-token KL penalty, critic values from
// `critic`, GAE, `epochs` updates of policy (optimizer) and critic (critic_optimizer, over critic.params()).
RlStepStats ppo_step(Model& policy, Model& reference, ValueHead& critic, AdamW& optimizer,
                     AdamW& critic_optimizer, const AdditionTask& task, std::span<const Problem> problems,
                     int64_t samples, const PpoConfig& config, const msg::SamplingParams& sampling, int64_t step,
                     int64_t epochs = 1, Precision precision = Precision::FP32, const TaskCodec& codec = char_codec());
// ppo_step's update from a batch sampled elsewhere by the current policy: ppo_step is sampling + this, bit for bit.
RlStepStats ppo_learn(Model& policy, Model& reference, ValueHead& critic, AdamW& optimizer,
                      AdamW& critic_optimizer, const RlBatch& batch, const PpoConfig& config, int64_t step,
                      int64_t epochs = 1, Precision precision = Precision::FP32, int32_t pad_id = kTaskPad);

}  // namespace moerl::rl
