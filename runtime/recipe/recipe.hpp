// A recipe: the YAML file `moerl run` executes — the model, the precision, the data and the stages
// (pretrain, sft, ...) in order. Every field is checked when the file is read; errors name file:line: field.
#pragma once
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "kernels/linear.hpp"
#include "runtime/model/config.hpp"
#include "runtime/optim/adamw.hpp"
#include "runtime/recipe/rl_stage.hpp"

namespace moerl {

struct DataSpec {
  std::string corpus = "brown";       // "brown" (fetched with npm) or a JSONL file of {"text": ...} lines
  std::filesystem::path dir = "data/brown";  // where the corpus lives / is fetched to
  int64_t vocab_size = 2000;          // BPE tokenizer trained on the train split (overrides model.vocab_size)
  int64_t validation_every = 20;      // every Nth document goes to the validation split
};

struct StageSpec {
  std::string name;                   // unique within the recipe; names its checkpoint folder
  std::string kind;                   // "pretrain" | "sft" | "reward_model" | "dpo" | "rlhf" | "eval_task"
  std::filesystem::path data;         // sft: JSONL of {"prompt", "response"} lines; reward_model, dpo: optional
                                      // JSONL of {"prompt", "chosen", "rejected"} (else machine-judged task pairs)
  int64_t steps = 100;
  int64_t batch = 8;                  // sequences per step
  int64_t seq = 128;                  // tokens per sequence
  AdamWConfig optimizer;
  float mtp_weight = 0.0f;            // λ of the multi-token-prediction loss
  float balance_alpha = 0.0f;         // sequence-wise balance loss α
  float bias_gamma = 0.001f;          // auxiliary-loss-free bias update speed γ (0 = off)
  int64_t eval_every = 50;            // validation loss every N steps (and at the end)
  int64_t eval_batches = 8;
  int64_t checkpoint_every = 100;     // also at the end
  RlStageSpec rl;                     // reward_model, dpo, rlhf, eval_task: their own fields (rl_stage.hpp)
};

// How the driver splits the training (runtime/parallel/): pipeline stages x expert shards per stage, or data-
// parallel replicas x tensor-parallel ranks. All 1: one stage trainer holds the whole model.
struct ParallelSpec {
  int64_t pipeline = 1;       // stage trainers, each a consecutive range of layers (1F1B schedule)
  int64_t expert = 1;         // expert shards per pipeline stage (routed experts split over them)
  int64_t data = 1;           // data-parallel replicas (ZeRO-1 optimizer), each a slice of every batch
  int64_t tensor = 1;         // tensor-parallel ranks per replica (attention heads and dense FFN split)
  int64_t micro_batches = 1;  // per step, pipeline only
  bool any() const { return pipeline * expert * data * tensor > 1; }
};

struct Recipe {
  std::filesystem::path file;
  std::string name;
  uint64_t seed = 1234;
  Precision precision = Precision::FP32;
  Device device = Device::CPU;        // where the model trains: cpu, or cuda (the current GPU; needs a CUDA build)
  int threads = 0;                    // 0: all cores
  std::filesystem::path out;          // run folder: checkpoints, metrics.jsonl, summary.json
  ModelConfig model;
  DataSpec data;
  std::vector<StageSpec> stages;
  ParallelSpec parallelism;
};

// "cpu" or "cuda", as a recipe spells it.
const char* device_name(Device device);

// Reads and validates `file`; `overrides` are "dotted.path=value" strings applied to the YAML before
// validation (e.g. "stages.0.steps=20", "precision=fp8").
Recipe load_recipe(const std::filesystem::path& file, const std::vector<std::string>& overrides = {});

}  // namespace moerl
