#include "runtime/train/trainer.hpp"

#include <chrono>
#include <cmath>
#include <cstdio>

#include "runtime/error.hpp"
#include "runtime/optim/adamw.hpp"
#include "runtime/safetensors.hpp"
#include "runtime/train/checkpoint.hpp"
#include "runtime/util/progress.hpp"

namespace moerl {
namespace fs = std::filesystem;

namespace {

TokenBatch view(const Batch& b) { return TokenBatch{b.input_ids.data(), b.labels.data(), b.batch, b.seq}; }

// max/mean of the tokens each expert received, averaged over MoE layers: 1.0 is perfect balance.
double mean_max_load_ratio(const std::vector<ExpertLoad>& loads) {
  double sum = 0;
  int n = 0;
  for (const ExpertLoad& l : loads) {
    if (l.tokens_per_expert.empty()) continue;
    int64_t total = 0, max = 0;
    for (int64_t t : l.tokens_per_expert) { total += t; max = std::max(max, t); }
    if (total == 0) continue;
    sum += static_cast<double>(max) * static_cast<double>(l.tokens_per_expert.size()) / static_cast<double>(total);
    ++n;
  }
  return n ? sum / n : 0.0;
}

nlohmann::json outcome_json(const StageOutcome& o) {
  nlohmann::json curve = nlohmann::json::array();
  for (auto [step, loss] : o.validation_curve) curve.push_back({step, loss});
  return {{"stage", o.stage}, {"steps", o.steps}, {"train_loss", o.train_loss},
          {"validation_loss", o.validation_loss}, {"wall_s", o.wall_s}, {"tokens_per_s", o.tokens_per_s},
          {"validation_curve", curve}};
}

StageOutcome outcome_from_json(const nlohmann::json& j) {
  StageOutcome o;
  o.stage = j.at("stage").get<std::string>();
  o.steps = j.at("steps").get<int64_t>();
  o.train_loss = j.at("train_loss").get<double>();
  o.validation_loss = j.at("validation_loss").get<double>();
  o.wall_s = j.at("wall_s").get<double>();
  o.tokens_per_s = j.at("tokens_per_s").get<double>();
  for (const auto& p : j.at("validation_curve")) o.validation_curve.emplace_back(p[0].get<int64_t>(), p[1].get<double>());
  return o;
}

}  // namespace

double validation_loss(TrainingBackend& backend, const std::vector<Batch>& batches, Precision precision) {
  double total = 0;
  int64_t tokens = 0;
  ForwardOptions options;
  options.precision = precision;
  options.for_backward = false;
  for (const Batch& b : batches) {
    const LossReport r = backend.forward(view(b), options);
    total += r.loss * static_cast<double>(r.tokens);
    tokens += r.tokens;
  }
  return tokens ? total / static_cast<double>(tokens) : 0.0;
}

double validation_loss(Model& model, const std::vector<Batch>& batches, Precision precision) {
  return validation_loss(*make_cpu_backend(model), batches, precision);
}

StageOutcome run_stage(const Recipe& recipe, const StageSpec& stage, Model& model, const Tokenizer* tokenizer,
                       BatchSource& data, MetricsLog& metrics, const fs::path& dir) {
  return run_stage(recipe, stage, *make_cpu_backend(model), tokenizer, data, metrics, dir);
}

StageOutcome run_stage(const Recipe& recipe, const StageSpec& stage, TrainingBackend& backend,
                       const Tokenizer* tokenizer, BatchSource& data, MetricsLog& metrics, const fs::path& dir) {
  backend.start_stage(stage.optimizer);
  const bool on_cpu = backend.device() == "cpu";  // other devices add "device" to metrics and checkpoints
  StageOutcome outcome;
  outcome.stage = stage.name;
  int64_t start = 0;
  double wall_before = 0;  // seconds spent before a resume

  // Resume from this stage's checkpoint (or the previous one that a crash mid-replace left beside it).
  fs::path ckpt = dir;
  if (!fs::exists(ckpt / "trainer_state.json") && fs::exists(dir.string() + ".old/trainer_state.json"))
    ckpt = dir.string() + ".old";
  if (auto state = read_trainer_state(ckpt)) {
    const std::string where = (ckpt / "trainer_state.json").string();
    require(state->value("stage", "") == stage.name, where + ": belongs to stage \"" + state->value("stage", "") +
                                                         "\", expected \"" + stage.name + "\"");
    backend.load_weights(read_safetensors(ckpt / "model.safetensors"));
    start = state->at("step").get<int64_t>();
    outcome = outcome_from_json(state->at("outcome"));
    wall_before = outcome.wall_s;
    if (start >= stage.steps) {
      std::fprintf(stderr, "%-10s already complete in %s (%lld steps), skipped\n", stage.name.c_str(),
                   dir.c_str(), static_cast<long long>(start));
      return outcome;
    }
    backend.load_optimizer_state(read_safetensors(ckpt / "optimizer.safetensors"));
    data.restore(LoaderState::from_json(state->at("loader"), where));
    std::fprintf(stderr, "%-10s resuming from %s at step %lld\n", stage.name.c_str(), ckpt.c_str(),
                 static_cast<long long>(start));
  }

  ForwardOptions options;
  options.precision = recipe.precision;
  options.mtp_weight = backend.config().num_nextn_predict_layers > 0 ? stage.mtp_weight : 0.0f;
  options.balance_alpha = stage.balance_alpha;

  ProgressBar bar(stage.name, stage.steps);
  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  int64_t tokens_done = 0;
  std::vector<double> recent;  // training losses, for the end-of-stage mean
  double last_val = outcome.validation_loss;
  for (int64_t step = start + 1; step <= stage.steps; ++step) {
    const Batch batch = data.next();
    backend.zero_grad();
    const LossReport r = backend.forward(view(batch), options);
    require(std::isfinite(r.total), "stage " + stage.name + ": the loss became " + std::to_string(r.total) +
                                        " at step " + std::to_string(step) + " (try a lower learning rate)");
    backend.backward();
    const auto stats = backend.optimizer_step(step - 1);  // the optimizer counts steps from 0
    const double load_ratio = mean_max_load_ratio(backend.expert_loads());
    if (stage.bias_gamma > 0) backend.update_router_bias(stage.bias_gamma);
    tokens_done += batch.batch * batch.seq;
    recent.push_back(r.loss);

    nlohmann::json m = {{"stage", stage.name}, {"step", step}, {"loss", r.loss}, {"lr", stats.lr},
                        {"grad_norm", stats.grad_norm}, {"tokens", r.tokens},
                        {"tokens_per_s", static_cast<double>(tokens_done) / std::max(elapsed(), 1e-9)},
                        {"precision", precision_name(recipe.precision)}};
    if (!on_cpu) m["device"] = backend.device();
    if (stats.skipped) m["skipped"] = true;
    if (options.mtp_weight > 0) m["mtp_loss"] = r.mtp_loss;
    if (options.balance_alpha > 0) m["balance_loss"] = r.balance_loss;
    if (load_ratio > 0) m["expert_max_load_ratio"] = load_ratio;
    if (step % stage.eval_every == 0 || step == stage.steps) {
      last_val = validation_loss(backend, data.validation, recipe.precision);
      m["validation_loss"] = last_val;
      outcome.validation_curve.emplace_back(step, last_val);
    }
    metrics.write(m);
    char fields[96];
    if (outcome.validation_curve.empty())
      std::snprintf(fields, sizeof fields, "loss %.3f  val -", r.loss);
    else
      std::snprintf(fields, sizeof fields, "loss %.3f  val %.3f", r.loss, last_val);
    bar.update(step, tokens_done, fields);

    if (step % stage.checkpoint_every == 0 || step == stage.steps) {
      const size_t tail = std::max<size_t>(1, recent.size() / 10);
      double sum = 0;
      for (size_t i = recent.size() - tail; i < recent.size(); ++i) sum += recent[i];
      outcome.steps = step;
      outcome.train_loss = sum / static_cast<double>(tail);
      outcome.validation_loss = last_val;
      outcome.wall_s = wall_before + elapsed();
      outcome.tokens_per_s = static_cast<double>(tokens_done) / std::max(elapsed(), 1e-9);
      nlohmann::json state = {{"stage", stage.name}, {"step", step}, {"loader", data.state().to_json()},
                              {"outcome", outcome_json(outcome)}, {"recipe", recipe.file.string()},
                              {"precision", precision_name(recipe.precision)}};
      if (!on_cpu) state["device"] = backend.device();
      save_checkpoint(dir, backend.host_model(), tokenizer, &backend.host_optimizer(), &state);
    }
  }
  char fields[96];
  std::snprintf(fields, sizeof fields, "loss %.3f  val %.3f", outcome.train_loss, outcome.validation_loss);
  bar.finish(fields);
  return outcome;
}

}  // namespace moerl
