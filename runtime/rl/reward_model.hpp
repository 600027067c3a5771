// The reward model: the policy's architecture (embedding + decoder layers, as a ModelPart without the LM
// head), the final RMSNorm, and a scalar head "score.weight" [1, hidden] (HF's *ForSequenceClassification
// tensors with num_labels = 1). Trained on preference pairs with the Bradley–Terry loss
// −log σ(r_chosen − r_rejected), mean over pairs; judged by pairwise accuracy on held-out pairs (the fraction
// with r_chosen > r_rejected).
// Sequences are bos + prompt + response + eos token ids (preferences.hpp preference_tokens). The reward is the
// head summed over the response's positions, eos included: r = Σ_{t ≥ response_start} w · norm(h_t). HF's
// class reads the last token only (so its scores of a saved model differ; config.json says "response_sum"); a
// sum lets each position check its own token against what precedes it, so a wrong digit lowers the reward where
// it stands. Measured on the quickstart's judged addition pairs: from the 60% policy's backbone 65.8% held-out
// accuracy with the sum vs 58.3% with the last token; from the longer-trained backbone 85.1% vs 86.3%, but GRPO
// from the policy on that reward went 60.3% -> 71.8% with the sum and 60.3% -> 60.0% with the last token.
// Shorter sequences in a batch are right-padded, which causal attention keeps from changing the scored positions.
#pragma once
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "runtime/model/model.hpp"
#include "runtime/optim/adamw.hpp"

namespace moerl {

struct SafeTensors;

struct TokenPair {
  std::vector<int32_t> chosen, rejected;  // whole sequences (prompt + response), bos ... eos
  int64_t response_start = 0;             // both sequences' first response token (they share the prompt)
};

struct PairMetrics {
  double loss = 0;      // mean Bradley–Terry loss (nats)
  double accuracy = 0;  // fraction of pairs with r_chosen > r_rejected (a tie counts as wrong)
  double margin = 0;    // mean r_chosen − r_rejected
  int64_t pairs = 0;
};

class RewardModel {
 public:
  explicit RewardModel(const ModelConfig& config);
  ~RewardModel();
  RewardModel(const RewardModel&) = delete;
  RewardModel& operator=(const RewardModel&) = delete;

  // Backbone as Model::init_random (normal(0, initializer_range), norms one, router bias zero); the head too.
  void init_random(uint64_t seed);
  // Weights from a policy checkpoint (an SFT model: its LM head and MTP layer are ignored) or a saved reward
  // model. Every backbone tensor must be present with its shape (errors name the tensor and st.source);
  // score.weight is taken when present and otherwise kept (a policy has none: the head starts at its init).
  void load_weights(const SafeTensors& st);

  // One reward per sequence, the head summed over positions [response_starts[i], size) of sequence i; no
  // gradients kept.
  std::vector<float> score(const std::vector<std::vector<int32_t>>& sequences,
                           const std::vector<int64_t>& response_starts, Precision precision);
  // The reward of one rollout: prompt + response scored as training sequences are, which end in eos
  // (rl/preferences.hpp), so eos is appended unless the response already ends in it (one cut by the length limit).
  float score_rollout(std::span<const int32_t> prompt, std::span<const int32_t> response, Precision precision);
  // Forward and backward of the mean Bradley–Terry loss over `pairs`, scaled by `scale` (1 for a whole batch;
  // pairs/total for a micro-batch): gradients accumulated (+=) into params().*.grad.
  PairMetrics forward_backward(std::span<const TokenPair> pairs, Precision precision, double scale = 1.0);
  // Loss, accuracy and margin over `pairs`, `batch` pairs per forward, no gradients.
  PairMetrics evaluate(std::span<const TokenPair> pairs, Precision precision, int64_t batch = 64);

  void update_router_bias(float gamma);  // auxiliary-loss-free balancing from the last forward's load
  Params& params() { return params_; }
  const Params& params() const { return params_; }
  const ModelConfig& config() const { return config_; }

  // config.json (HF, architectures DeepseekV3ForSequenceClassification, num_labels 1) and model.safetensors.
  void save(const std::filesystem::path& dir) const;
  static std::unique_ptr<RewardModel> load(const std::filesystem::path& dir);

 private:
  // Rewards of `sequences` (right-padded into one batch); keeps what backward_scores needs when `train`.
  std::vector<float> forward_scores(const std::vector<const std::vector<int32_t>*>& sequences,
                                    const std::vector<int64_t>& response_starts, Precision precision, bool train);
  void backward_scores(std::span<const float> dreward);  // d loss / d r per sequence of the last forward

  ModelConfig config_;
  Params params_;
  std::unique_ptr<ModelPart> backbone_;
  Param* norm_ = nullptr;   // model.norm.weight [hidden]
  Param* head_ = nullptr;   // score.weight [1, hidden]
  // Saved by forward_scores for backward_scores.
  int64_t batch_ = 0, seq_ = 0;
  std::vector<int64_t> rows_, row_seq_;  // [scored] row in the [batch * seq] hidden states, its sequence
  std::vector<float> row_hidden_, normed_, rstd_;  // [scored, hidden], [scored, hidden], [scored]
};

struct RewardTrainConfig {
  int64_t steps = 200;
  int64_t batch = 16;            // pairs per step
  AdamWConfig optimizer;         // total_steps is set to steps
  Precision precision = Precision::FP32;
  float bias_gamma = 0.001f;     // router bias update speed (0 = off)
  uint64_t seed = 1;             // order of the training pairs (reshuffled every epoch)
  int64_t eval_every = 0;        // held-out accuracy every N steps (0: only at the end)
};

struct RewardTrainResult {
  std::vector<PairMetrics> steps;                    // per training step (that step's batch)
  std::vector<std::pair<int64_t, PairMetrics>> heldout_curve;  // (step, held-out metrics)
  PairMetrics train;                                 // whole training set, after training
  PairMetrics heldout;                               // held-out pairs, after training
  double wall_s = 0;
};

using RewardStepCallback = std::function<void(int64_t step, const PairMetrics& batch)>;

// Trains `rm` in place with AdamW on `train` (batches drawn in a seeded shuffled order), then measures
// both sets. Deterministic in the config and the inputs.
RewardTrainResult train_reward_model(RewardModel& rm, std::span<const TokenPair> train,
                                     std::span<const TokenPair> heldout, const RewardTrainConfig& config,
                                     const RewardStepCallback& on_step = {});

}  // namespace moerl
