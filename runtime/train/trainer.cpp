#include "runtime/train/trainer.hpp"

#include <chrono>
#include <cmath>
#include <cstdio>

#include "runtime/error.hpp"
#include "runtime/optim/adamw.hpp"
#include "runtime/safetensors.hpp"
#include "runtime/train/checkpoint.hpp"
#include "runtime/train/step_apply.hpp"
#include "runtime/util/progress.hpp"

namespace moerl {
namespace fs = std::filesystem;

namespace {

TokenBatch view(const Batch& b) { return TokenBatch{b.input_ids.data(), b.labels.data(), b.batch, b.seq}; }

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
  if (auto found = find_stage_checkpoint(dir)) {
    const fs::path& ckpt = found->folder;
    const nlohmann::json& state = found->state;
    const std::string where = (ckpt / "trainer_state.json").string();
    require(state.value("stage", "") == stage.name, where + ": belongs to stage \"" + state.value("stage", "") +
                                                         "\", expected \"" + stage.name + "\"");
    backend.load_weights(read_safetensors(ckpt / "model.safetensors"));
    start = state.at("step").get<int64_t>();
    outcome = stage_outcome_from_json(state.at("outcome"), where);
    wall_before = outcome.wall_s;
    if (start >= stage.steps) {
      std::fprintf(stderr, "%-10s already complete in %s (%lld steps), skipped\n", stage.name.c_str(),
                   dir.c_str(), static_cast<long long>(start));
      return outcome;
    }
    backend.load_optimizer_state(read_safetensors(ckpt / "optimizer.safetensors"));
    data.restore(LoaderState::from_json(state.at("loader"), where));
    std::fprintf(stderr, "%-10s resuming from %s at step %lld\n", stage.name.c_str(), ckpt.c_str(),
                 static_cast<long long>(start));
  }

  const ForwardOptions options = stage_forward_options(recipe, stage, backend.config());
  ProgressBar bar(stage.name, stage.steps);
  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  int64_t tokens_done = 0;
  std::vector<double> recent;  // training losses, for the end-of-stage mean
  double last_val = outcome.validation_loss;
  for (int64_t step = start + 1; step <= stage.steps; ++step) {
    const Batch batch = data.next();
    const StepReport report = apply_train_step(backend, view(batch), options, step, stage.bias_gamma, stage.name);
    const LossReport& r = report.loss;
    const StepStats& stats = report.stats;
    const double load_ratio = mean_max_load_ratio(report.expert_loads);
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
      outcome.steps = step;
      outcome.train_loss = tail_mean(recent);
      outcome.validation_loss = last_val;
      outcome.wall_s = wall_before + elapsed();
      outcome.tokens_per_s = static_cast<double>(tokens_done) / std::max(elapsed(), 1e-9);
      nlohmann::json state = {{"stage", stage.name}, {"step", step}, {"loader", data.state().to_json()},
                              {"outcome", stage_outcome_json(outcome)}, {"recipe", recipe.file.string()},
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
