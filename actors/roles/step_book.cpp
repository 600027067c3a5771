#include "actors/roles/step_book.hpp"

#include <algorithm>

#include "actors/envelope.hpp"
#include "runtime/optim/adamw.hpp"

namespace moerl::actors {

void StepBook::begin(std::string run, uint64_t resumed_step) {
  run_id = std::move(run);
  last_step = resumed_step;
  results.clear();
  begun = true;
}

void StepBook::check_run(const msg::StepId& step, const char* kind) const {
  if (!begun) throw Refusal(msg::ErrorCode::Unavailable, std::string(kind) + ": no stage has begun (send begin first)");
  if (step.run != run_id)
    throw Error(std::string(kind) + ".step.run: \"" + step.run + "\", expected the current stage's \"" + run_id + "\"");
}

std::optional<msg::TrainStepResult> StepBook::replay(const msg::TrainStep& cmd, const StageSpec& spec) const {
  check_run(cmd.step, "TrainStep");
  const uint64_t step = cmd.step.step;
  if (step <= last_step) {
    if (auto it = results.find(step); it != results.end()) return it->second;
    throw Refusal(msg::ErrorCode::StaleVersion, "TrainStep " + std::to_string(step) + " of " + run_id +
                                                    " precedes this trainer's checkpoint (step " +
                                                    std::to_string(last_step) + "); its result is not recorded");
  }
  if (step != last_step + 1)
    throw Error("TrainStep.step: " + std::to_string(step) + ", expected " + std::to_string(last_step + 1) +
                " (steps are applied in order)");
  require(cmd.batches.size() == 1, "TrainStep.batches: " + std::to_string(cmd.batches.size()) +
                                       " batches, a trainer takes the step's batch as one");
  const double lr = learning_rate(spec.optimizer, static_cast<int64_t>(step) - 1);
  require(cmd.learning_rate == lr, "TrainStep.learningRate: " + std::to_string(cmd.learning_rate) +
                                       ", expected the stage's schedule at this step, " + std::to_string(lr));
  return std::nullopt;
}

void StepBook::record(const msg::TrainStepResult& result) {
  last_step = result.step.step;
  results.emplace(last_step, result);
}

nlohmann::json StepBook::checkpoint_state(const msg::CheckpointRequest& req) const {
  check_run(req.step, "CheckpointRequest");
  require(req.step.step == last_step, "CheckpointRequest.step: " + std::to_string(req.step.step) +
                                          ", expected the last applied step " + std::to_string(last_step));
  nlohmann::json state;
  try {
    state = nlohmann::json::parse(req.trainer_state);
  } catch (const nlohmann::json::exception& ex) {
    throw Error(std::string("CheckpointRequest.trainerState: not JSON (") + ex.what() + ")");
  }
  require(state.is_object(), "CheckpointRequest.trainerState: expected a JSON object");
  return state;
}

std::vector<msg::ExpertLoad> loads_message(const std::vector<ExpertLoad>& loads, const ModelConfig& c) {
  std::vector<uint32_t> layers;
  for (int64_t l = 0; l < c.num_hidden_layers + c.num_nextn_predict_layers; ++l)
    if (c.is_moe_layer(l)) layers.push_back(static_cast<uint32_t>(l));
  std::vector<msg::ExpertLoad> out;
  for (size_t i = 0; i < loads.size(); ++i) {
    msg::ExpertLoad e{i < layers.size() ? layers[i] : static_cast<uint32_t>(i), {}};
    for (int64_t t : loads[i].tokens_per_expert) e.tokens_per_expert.push_back(static_cast<uint32_t>(t));
    out.push_back(std::move(e));
  }
  return out;
}

uint64_t loss_tokens(const msg::TokenBatch& batch) {
  return static_cast<uint64_t>(
      std::count_if(batch.labels.begin(), batch.labels.end(), [](int32_t l) { return l != msg::kNoLossLabel; }));
}

}  // namespace moerl::actors
