// One training stage (pretraining or SFT) of a recipe: batches from a resumable loader, forward and
// backward in the recipe's precision, AdamW, auxiliary-loss-free router balancing, validation at
// intervals, metrics as JSON lines, checkpoints that resume bit for bit. The same loop runs on any
// TrainingBackend (backend.hpp): the CPU's Model and AdamW, or a GPU's.
#pragma once
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/data/loader.hpp"
#include "runtime/data/tokenizer.hpp"
#include "runtime/model/model.hpp"
#include "runtime/recipe/recipe.hpp"
#include "runtime/train/backend.hpp"
#include "runtime/train/metrics.hpp"

namespace moerl {

// Where a stage's batches come from: next() for training, with a resumable position, and a fixed list of
// validation batches.
struct BatchSource {
  std::function<Batch()> next;
  std::function<LoaderState()> state;
  std::function<void(const LoaderState&)> restore;
  std::vector<Batch> validation;
};

struct StageOutcome {
  std::string stage;
  int64_t steps = 0;
  double train_loss = 0;      // mean of the last 10% of steps
  double validation_loss = 0; // at the end
  double wall_s = 0;
  double tokens_per_s = 0;
  std::vector<std::pair<int64_t, double>> validation_curve;  // (step, loss)
};

// Mean main-model cross-entropy over the batches (no gradients kept).
double validation_loss(Model& model, const std::vector<Batch>& batches, Precision precision);
double validation_loss(TrainingBackend& backend, const std::vector<Batch>& batches, Precision precision);

// Runs `stage` on `backend` (a fresh optimizer for the stage). `dir` is the stage's checkpoint folder: when it
// holds an unfinished checkpoint of this stage the run resumes from it (model, optimizer, loader); a finished
// one is loaded and returned at once.
StageOutcome run_stage(const Recipe& recipe, const StageSpec& stage, TrainingBackend& backend,
                       const Tokenizer* tokenizer, BatchSource& data, MetricsLog& metrics,
                       const std::filesystem::path& dir);
// The same on the CPU: `model` trained in place.
StageOutcome run_stage(const Recipe& recipe, const StageSpec& stage, Model& model, const Tokenizer* tokenizer,
                       BatchSource& data, MetricsLog& metrics, const std::filesystem::path& dir);

}  // namespace moerl
