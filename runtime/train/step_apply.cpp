#include "runtime/train/step_apply.hpp"

#include <algorithm>
#include <cmath>

#include "runtime/error.hpp"
#include "runtime/train/checkpoint.hpp"

namespace moerl {
namespace fs = std::filesystem;

ForwardOptions stage_forward_options(const Recipe& recipe, const StageSpec& stage, const ModelConfig& config) {
  ForwardOptions options;
  options.precision = recipe.precision;
  options.mtp_weight = config.num_nextn_predict_layers > 0 ? stage.mtp_weight : 0.0f;
  options.balance_alpha = stage.balance_alpha;
  return options;
}

StepReport apply_train_step(TrainingBackend& backend, const TokenBatch& batch, const ForwardOptions& options,
                            int64_t step, float bias_gamma, const std::string& stage_name) {
  StepReport r;
  backend.zero_grad();
  r.loss = backend.forward(batch, options);
  require(std::isfinite(r.loss.total), "stage " + stage_name + ": the loss became " + std::to_string(r.loss.total) +
                                           " at step " + std::to_string(step) + " (try a lower learning rate)");
  backend.backward();
  r.stats = backend.optimizer_step(step - 1);  // the optimizer counts steps from 0
  r.expert_loads = backend.expert_loads();
  if (bias_gamma > 0) backend.update_router_bias(bias_gamma);
  return r;
}

double mean_max_load_ratio(const std::vector<ExpertLoad>& loads) {
  double sum = 0;
  int n = 0;
  for (const ExpertLoad& l : loads) {
    if (l.tokens_per_expert.empty()) continue;
    int64_t total = 0, max = 0;
    for (int64_t t : l.tokens_per_expert) {
      total += t;
      max = std::max(max, t);
    }
    if (total == 0) continue;
    sum += static_cast<double>(max) * static_cast<double>(l.tokens_per_expert.size()) / static_cast<double>(total);
    ++n;
  }
  return n ? sum / n : 0.0;
}

double tail_mean(const std::vector<double>& losses) {
  if (losses.empty()) return 0;
  const size_t tail = std::max<size_t>(1, losses.size() / 10);
  double sum = 0;
  for (size_t i = losses.size() - tail; i < losses.size(); ++i) sum += losses[i];
  return sum / static_cast<double>(tail);
}

nlohmann::json stage_outcome_json(const StageOutcome& o) {
  nlohmann::json curve = nlohmann::json::array();
  for (auto [step, loss] : o.validation_curve) curve.push_back({step, loss});
  return {{"stage", o.stage}, {"steps", o.steps}, {"train_loss", o.train_loss},
          {"validation_loss", o.validation_loss}, {"wall_s", o.wall_s}, {"tokens_per_s", o.tokens_per_s},
          {"validation_curve", curve}};
}

StageOutcome stage_outcome_from_json(const nlohmann::json& j, const std::string& where) {
  try {
    StageOutcome o;
    o.stage = j.at("stage").get<std::string>();
    o.steps = j.at("steps").get<int64_t>();
    o.train_loss = j.at("train_loss").get<double>();
    o.validation_loss = j.at("validation_loss").get<double>();
    o.wall_s = j.at("wall_s").get<double>();
    o.tokens_per_s = j.at("tokens_per_s").get<double>();
    for (const auto& p : j.at("validation_curve"))
      o.validation_curve.emplace_back(p.at(0).get<int64_t>(), p.at(1).get<double>());
    return o;
  } catch (const nlohmann::json::exception& e) {
    throw Error(where + ": outcome: " + e.what());
  }
}

std::optional<StageCheckpoint> find_stage_checkpoint(const fs::path& dir) {
  fs::path ckpt = dir;
  if (!fs::exists(ckpt / "trainer_state.json") && fs::exists(dir.string() + ".old/trainer_state.json"))
    ckpt = dir.string() + ".old";
  if (auto state = read_trainer_state(ckpt)) return StageCheckpoint{ckpt, std::move(*state)};
  return std::nullopt;
}

}  // namespace moerl
