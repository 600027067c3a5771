// The step bookkeeping of every stage trainer (the single one of training_roles.cpp and the parties of
// party_trainer.cpp): which stage has begun, which steps are applied, what a repeated step answers, and the
// checks of the driver's TrainStep, EvalRequest and CheckpointRequest commands.
#pragma once
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/messages/control.hpp"
#include "runtime/messages/types.hpp"
#include "runtime/model/model.hpp"
#include "runtime/recipe/recipe.hpp"

namespace moerl::actors {

struct StepBook {
  bool begun = false;
  std::string run_id;                                 // stage_run_id of the stage that has begun
  uint64_t last_step = 0;                             // applied steps of the stage
  std::map<uint64_t, msg::TrainStepResult> results;  // by step: what a repeated step answers

  // A new stage: nothing applied yet (or `last_step` from its checkpoint), nothing recorded.
  void begin(std::string run, uint64_t resumed_step);
  // Refuses commands before begin (Unavailable) and commands of another run (Error naming `kind`.step.run).
  void check_run(const msg::StepId& step, const char* kind) const;
  // The recorded result when `cmd` repeats an applied step; nullopt when it is the next step and carries one
  // batch and `spec`'s learning rate at that step. Throws for anything else (a step before the checkpoint:
  // StaleVersion; a gap, several batches or another learning rate: Error naming the field).
  std::optional<msg::TrainStepResult> replay(const msg::TrainStep& cmd, const StageSpec& spec) const;
  // The step was applied: it answers `result` from now on.
  void record(const msg::TrainStepResult& result);
  // The trainer state of a CheckpointRequest for the last applied step, parsed (Error naming the field).
  nlohmann::json checkpoint_state(const msg::CheckpointRequest& req) const;
};

// ExpertLoad entries come main-model MoE layers first, then the MTP layer (layer num_hidden_layers).
std::vector<msg::ExpertLoad> loads_message(const std::vector<ExpertLoad>& loads, const ModelConfig& config);

// Tokens of `batch` that count in the loss (labels other than kNoLossLabel).
uint64_t loss_tokens(const msg::TokenBatch& batch);

}  // namespace moerl::actors
