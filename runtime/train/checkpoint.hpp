// Checkpoint folders. A model folder is what HF transformers loads:
//   config.json          HF DeepseekV3Config
//   model.safetensors    FP32 weights, published DeepSeek-V3 tensor names (MTP under model.layers.{L}.)
//   tokenizer.model      SentencePiece model (when the run has one)
// A training checkpoint adds what resuming needs, so a resumed run repeats the uninterrupted one bit for bit:
//   optimizer.safetensors  AdamW moments (BF16) and step
//   trainer_state.json     stage, step, data loader position, metrics so far
// Writes go to a temporary folder that is renamed into place: a crash leaves the previous checkpoint whole.
#pragma once
#include <filesystem>
#include <memory>
#include <optional>

#include <nlohmann/json.hpp>

#include "runtime/data/tokenizer.hpp"
#include "runtime/model/model.hpp"

namespace moerl {

class AdamW;

struct LoadedModel {
  std::unique_ptr<Model> model;
  std::optional<Tokenizer> tokenizer;  // when the folder has tokenizer.model
};

// Loads config.json + model.safetensors (+ tokenizer.model) from any HF-format DeepSeek-V3 folder. When the
// config asks for MTP layers but the file has none (checkpoints saved by transformers), MTP is turned off.
LoadedModel load_model_dir(const std::filesystem::path& dir);

// Writes config.json, model.safetensors and (if given) tokenizer.model, plus optimizer state and
// trainer_state.json when given, atomically into `dir`.
void save_checkpoint(const std::filesystem::path& dir, const Model& model, const Tokenizer* tokenizer,
                     const AdamW* optimizer, const nlohmann::json* trainer_state);

// trainer_state.json of `dir`, if the folder holds a training checkpoint.
std::optional<nlohmann::json> read_trainer_state(const std::filesystem::path& dir);

}  // namespace moerl
