// What the RL flow tests share: a small corpus of sentences with sums ("we add 3+4=7 today."), so the BPE
// tokenizer learns digits, '+' and '='; a tiny recipe that pretrains on it and trains a reward model; and the
// OpenMP thread count that run_recipe changes, restored.
#pragma once
#include <omp.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>

#include <nlohmann/json.hpp>

#include "runtime/recipe/recipe.hpp"

namespace moerl::test {

// Writes <dir>/corpus.jsonl: 40 documents of 20 sentences, the same every time (seeded); returns its path.
inline std::filesystem::path write_sums_corpus(const std::filesystem::path& dir) {
  std::mt19937 rng(3);
  const std::filesystem::path file = dir / "corpus.jsonl";
  std::ofstream f(file);
  for (int d = 0; d < 40; ++d) {
    std::string text;
    for (int s = 0; s < 20; ++s) {
      const int a = static_cast<int>(rng() % 10), b = static_cast<int>(rng() % 10);
      text += "we add " + std::to_string(a) + "+" + std::to_string(b) + "=" + std::to_string(a + b) + " today. ";
    }
    f << nlohmann::json{{"text", text}}.dump() << "\n";
  }
  return file;
}

// A tiny model (2 layers, 4 experts top-2) pretrained 10 steps on `corpus`, then a reward model ("rm") trained
// `rm_steps` steps on `rm_pairs` single-digit sum pairs; one thread (a tiny model: OpenMP fork/join costs more
// than it saves, measured 1 s vs 15 s CPU). Its recipe file is <out>/recipe.yaml (not written).
inline Recipe tiny_rm_recipe(const std::string& name, const std::filesystem::path& corpus,
                             const std::filesystem::path& out, int64_t rm_steps, int64_t rm_pairs) {
  Recipe r;
  r.file = out / "recipe.yaml";
  r.name = name;
  r.seed = 5;
  r.threads = 1;
  r.out = out;
  r.data.corpus = corpus.string();
  r.data.vocab_size = 300;
  r.data.validation_every = 10;
  ModelConfig& c = r.model;
  c.hidden_size = 32; c.intermediate_size = 64; c.moe_intermediate_size = 16; c.num_hidden_layers = 2;
  c.num_attention_heads = 2; c.kv_lora_rank = 16; c.qk_nope_head_dim = 8; c.qk_rope_head_dim = 8;
  c.v_head_dim = 8; c.n_routed_experts = 4; c.num_experts_per_tok = 2;
  StageSpec pre;
  pre.name = "pretrain";
  pre.kind = "pretrain";
  pre.steps = 10;
  pre.batch = 4;
  pre.seq = 32;
  pre.eval_every = 10;
  pre.eval_batches = 2;
  pre.optimizer.lr = 1e-2;
  pre.optimizer.total_steps = pre.steps;
  r.stages.push_back(pre);
  StageSpec rm;
  rm.name = "rm";
  rm.kind = "reward_model";
  rm.steps = rm_steps;
  rm.batch = 16;
  rm.eval_every = 10;
  rm.optimizer.lr = 3e-3;
  rm.optimizer.weight_decay = 0.0;
  rm.rl.task_digits = 1;
  rm.rl.pairs = rm_pairs;
  r.stages.push_back(rm);
  return r;
}

// run_recipe sets the process-wide OpenMP thread count: restored for the tests that follow in this binary.
struct RestoreThreads {
  int threads = omp_get_max_threads();
  ~RestoreThreads() { omp_set_num_threads(threads); }
};

}  // namespace moerl::test
