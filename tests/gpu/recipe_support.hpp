// What the GPU training tests share: a small synthetic corpus and pretraining recipe on the GPU, a fresh scratch
// folder, and a run's per-step losses.
#pragma once
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/model/config.hpp"
#include "runtime/recipe/recipe.hpp"
#include "tests/support/grammar_corpus.hpp"

namespace moerl::gpu_test {

// Head dims the GPU attention kernels take (qk 24, v 16); two layers: one dense, one MoE (8 experts top-2 + 1
// shared); MTP on; vocabulary 512 (a recipe's tokenizer sets its own).
inline ModelConfig small_gpu_config() {
  ModelConfig c;
  c.vocab_size = 512;
  c.hidden_size = 64;
  c.intermediate_size = 128;
  c.moe_intermediate_size = 32;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.kv_lora_rank = 16;
  c.qk_nope_head_dim = 16;
  c.qk_rope_head_dim = 8;
  c.v_head_dim = 16;
  c.first_k_dense_replace = 1;
  c.n_routed_experts = 8;
  c.num_experts_per_tok = 2;
  c.n_shared_experts = 1;
  c.num_nextn_predict_layers = 1;
  return c;
}

// A small model whose dimensions suit the FP8 recipe's 128-wide tiles, with the benchmark's attention head dims
// (qk 64 + 32 = 96, v 64), MTP, shared experts and group-limited routing.
inline ModelConfig tile_gpu_config(int64_t q_lora_rank = 0) {
  ModelConfig c;
  c.vocab_size = 512;
  c.hidden_size = 256;
  c.intermediate_size = 512;
  c.moe_intermediate_size = 128;
  c.num_hidden_layers = 3;
  c.first_k_dense_replace = 1;
  c.num_attention_heads = 4;
  c.q_lora_rank = q_lora_rank;
  c.kv_lora_rank = 128;
  c.qk_nope_head_dim = 64;
  c.qk_rope_head_dim = 32;
  c.v_head_dim = 64;
  c.n_routed_experts = 8;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 2;
  c.n_group = 2;
  c.topk_group = 1;
  c.routed_scaling_factor = 2.5;
  c.num_nextn_predict_layers = 1;
  c.max_position_embeddings = 256;
  c.initializer_range = 0.05;  // larger than 0.02 so every layer moves the logits visibly
  return c;
}

// Writes <dir>/corpus.jsonl (60 documents of 12 random sentences over a 216-sentence grammar, seed 42) and returns
// a `steps`-step pretraining recipe on it, device cuda, with `model` (vocabulary 300, batch 4 x 32, MTP 0.3,
// balance 1e-3, evaluation and checkpoints every 3 steps, lr 1e-2 warmed up over 2 steps), its run folder
// <dir>/run.
inline Recipe small_gpu_recipe(const std::filesystem::path& dir, int64_t steps, const std::string& name,
                               const ModelConfig& model) {
  moerl::test::write_grammar_corpus(dir / "corpus.jsonl");
  Recipe r;
  r.file = dir / "recipe.yaml";
  r.name = name;
  r.seed = 5;
  r.threads = 2;
  r.device = Device::CUDA;
  r.out = dir / "run";
  r.data.corpus = (dir / "corpus.jsonl").string();
  r.data.vocab_size = 300;
  r.data.validation_every = 10;
  r.model = model;
  StageSpec s;
  s.name = "pretrain";
  s.kind = "pretrain";
  s.steps = steps;
  s.batch = 4, s.seq = 32;
  s.mtp_weight = 0.3f, s.balance_alpha = 1e-3f;
  s.eval_every = 3, s.eval_batches = 4, s.checkpoint_every = 3;
  s.optimizer.lr = 1e-2, s.optimizer.warmup_steps = 2, s.optimizer.total_steps = 6;
  r.stages.push_back(s);
  return r;
}

// An empty folder <tmp>/moerl-<name> (removed first if it exists).
inline std::filesystem::path fresh_dir(const std::string& name) {
  const std::filesystem::path d = std::filesystem::temp_directory_path() / ("moerl-" + name);
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d;
}

// The losses of a run's metrics.jsonl, one per step line, in file order.
inline std::vector<double> step_losses(const std::filesystem::path& metrics) {
  std::vector<double> out;
  std::ifstream f(metrics);
  for (std::string line; std::getline(f, line);) {
    const auto j = nlohmann::json::parse(line);
    if (j.contains("loss") && j.contains("step")) out.push_back(j["loss"].get<double>());
  }
  return out;
}

}  // namespace moerl::gpu_test
