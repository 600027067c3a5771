#include "runtime/train/checkpoint.hpp"

#include <fstream>

#include "runtime/error.hpp"
#include "runtime/optim/adamw.hpp"
#include "runtime/safetensors.hpp"
#include "runtime/util/files.hpp"

namespace moerl {
namespace fs = std::filesystem;

LoadedModel load_model_dir(const fs::path& dir) {
  require(fs::is_directory(dir), dir.string() + ": not a checkpoint folder (expected config.json and model.safetensors)");
  const fs::path config_file = dir / "config.json";
  require(fs::is_regular_file(config_file), config_file.string() + ": missing (an HF DeepseekV3Config is expected)");
  nlohmann::json j;
  try {
    std::ifstream f(config_file);
    j = nlohmann::json::parse(f);
  } catch (const nlohmann::json::exception& e) {
    throw Error(config_file.string() + ": not valid JSON: " + e.what());
  }
  ModelConfig config = ModelConfig::from_hf_json(j, config_file.string());
  const SafeTensors weights = read_safetensors(dir / "model.safetensors");
  const std::string mtp_prefix = "model.layers." + std::to_string(config.num_hidden_layers) + ".";
  if (config.num_nextn_predict_layers > 0) {
    bool has_mtp = false;
    for (const auto& [name, t] : weights.tensors) has_mtp |= name.rfind(mtp_prefix, 0) == 0;
    if (!has_mtp) config.num_nextn_predict_layers = 0;  // transformers drops MTP weights when it saves
  }
  LoadedModel out;
  out.model = std::make_unique<Model>(config);
  out.model->load_weights(weights);
  if (fs::exists(dir / Tokenizer::kFileName)) out.tokenizer = Tokenizer::load(dir / Tokenizer::kFileName);
  return out;
}

void save_checkpoint(const fs::path& dir, const Model& model, const Tokenizer* tokenizer, const AdamW* optimizer,
                     const nlohmann::json* trainer_state) {
  const fs::path tmp = dir.string() + ".tmp";
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  write_file_durably(tmp / "config.json", model.config().to_hf_json().dump(2) + "\n");
  std::map<std::string, const Tensor*> tensors;
  for (const auto& [name, p] : model.params().all()) tensors[name] = &p.value;
  // The published checkpoints repeat the shared embedding and output head inside the MTP layer.
  const ModelConfig& c = model.config();
  if (c.num_nextn_predict_layers > 0) {
    const std::string mtp = "model.layers." + std::to_string(c.num_hidden_layers) + ".";
    tensors[mtp + "embed_tokens.weight"] = &model.params().at("model.embed_tokens.weight").value;
    tensors[mtp + "shared_head.head.weight"] =
        &model.params().at(c.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight").value;
  }
  write_safetensors(tmp / "model.safetensors", tensors, {{"format", "pt"}});
  if (tokenizer) tokenizer->save(tmp);
  if (optimizer) write_safetensors(tmp / "optimizer.safetensors", optimizer->state());
  if (trainer_state) write_file_durably(tmp / "trainer_state.json", trainer_state->dump(2) + "\n");
  replace_directory(tmp, dir);
}

std::optional<nlohmann::json> read_trainer_state(const fs::path& dir) {
  const fs::path file = dir / "trainer_state.json";
  if (!fs::is_regular_file(file)) return std::nullopt;
  try {
    std::ifstream f(file);
    return nlohmann::json::parse(f);
  } catch (const nlohmann::json::exception& e) {
    throw Error(file.string() + ": not valid JSON: " + e.what());
  }
}

}  // namespace moerl
