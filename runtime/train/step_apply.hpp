// One training step, one evaluation and the stage bookkeeping of a stage, as functions: run_stage (trainer.hpp)
// loops over them, and callers that drive a stage one message at a time (the stage-trainer and driver actors) call
// them in the same order, so a stage driven either way gives the same bits.
#pragma once
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/model/model.hpp"
#include "runtime/optim/adamw.hpp"
#include "runtime/recipe/recipe.hpp"
#include "runtime/train/backend.hpp"
#include "runtime/train/trainer.hpp"

namespace moerl {

// run_stage's forward options for `stage`: the recipe's precision, the MTP weight when the model has an MTP
// layer, the balance loss weight.
ForwardOptions stage_forward_options(const Recipe& recipe, const StageSpec& stage, const ModelConfig& config);

struct StepReport {
  LossReport loss;
  StepStats stats;
  std::vector<ExpertLoad> expert_loads;  // of this step's forward, before the router bias moved
};

// zero_grad, forward, backward, optimizer step (`step` is 1-based, the optimizer's is step - 1), expert
// loads, router-bias update (bias_gamma > 0). A non-finite loss throws moerl::Error naming the stage and
// step, as run_stage does.
StepReport apply_train_step(TrainingBackend& backend, const TokenBatch& batch, const ForwardOptions& options,
                            int64_t step, float bias_gamma, const std::string& stage_name);

// max/mean of the tokens each expert received, averaged over MoE layers (1.0: perfect balance; 0 without MoE):
// the metrics' expert_max_load_ratio.
double mean_max_load_ratio(const std::vector<ExpertLoad>& loads);

// Mean of the last 10% (at least one) of a stage's training losses: StageOutcome::train_loss.
double tail_mean(const std::vector<double>& losses);

// StageOutcome as trainer_state.json's "outcome" holds it, and back (`where` names the file in errors).
nlohmann::json stage_outcome_json(const StageOutcome& outcome);
StageOutcome stage_outcome_from_json(const nlohmann::json& j, const std::string& where);

// The checkpoint run_stage resumes from: `dir`, or `dir`.old that a crash mid-replace left beside it.
struct StageCheckpoint {
  std::filesystem::path folder;
  nlohmann::json state;  // trainer_state.json
};
std::optional<StageCheckpoint> find_stage_checkpoint(const std::filesystem::path& dir);

}  // namespace moerl
