// Pipeline × expert parallelism inside one process: every pipeline stage and every expert shard runs in its
// own thread, wired with in-process channels (data_plane.hpp) — what the stage-trainer and expert-shard
// actors do across processes, without actors. A training step:
//   split the batch into micro-batches; the whole batch's loss denominators;
//   every stage runs its 1F1B schedule (PipelineStage::run_step), every shard serves its stage;
//   the global gradient norm from every party's squares (pp_optimizer.hpp), AdamW per party;
//   the updated embedding to the last stage's copy; router biases from the step's expert load.
// The steps equal moerl::Model + moerl::AdamW on the whole batch (bit for bit with one micro-batch, when the
// single model runs with the parties' OpenMP thread count: OpenBLAS picks its GEMM kernels by thread count).
// Parties run their OpenMP loops and GEMMs on `threads_per_party` threads (default 1: the parallelism is the
// parties themselves; more threads per party on a machine with fewer cores than threads makes every OpenMP
// barrier wait for descheduled threads).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/optim/adamw.hpp"
#include "runtime/parallel/ep_shard.hpp"
#include "runtime/parallel/pp_optimizer.hpp"
#include "runtime/parallel/pp_stage.hpp"

namespace moerl {

class LocalPipeline {
 public:
  LocalPipeline(const ModelConfig& config, PipelinePlan plan, int threads_per_party = 1);
  ~LocalPipeline();

  // Every party's parameters from a whole model's (e.g. Model::init_random's, or a loaded checkpoint).
  void load_weights(const Params& source);
  // A fresh AdamW on every party; needed before train_step.
  void start_optimizer(const AdamWConfig& config);

  struct StepReport {
    LossReport loss;       // over the whole batch, as Model::forward reports it
    StepStats optimizer;   // grad_norm: the global norm before clipping
  };
  // One step on `batch` cut into `micro_batches` (split_micro_batches); `step` is the 0-based training step
  // (learning-rate schedule); bias_gamma > 0 moves the router biases as Model::update_router_bias does.
  StepReport train_step(const TokenBatch& batch, int64_t micro_batches, const ForwardOptions& options,
                        int64_t step, float bias_gamma = 0);
  // Forward only (options.for_backward is ignored): the losses of `batch`, no gradients.
  LossReport evaluate(const TokenBatch& batch, int64_t micro_batches, ForwardOptions options);

  int64_t stages() const { return static_cast<int64_t>(stages_.size()); }
  PipelineStage& stage(int64_t s) { return *stages_.at(static_cast<size_t>(s)); }
  // Expert shard `rank` of stage `s` (plan.expert_shards per stage).
  ExpertShard& shard(int64_t s, int64_t rank);
  // A parameter by its published name, on the party that trains it (not the last stage's embedding copy).
  const Param& param(const std::string& name) const;

 private:
  LossSums run(const TokenBatch& batch, int64_t micro_batches, const ForwardOptions& options);

  ModelConfig config_;
  PipelinePlan plan_;
  int threads_per_party_;
  std::vector<std::shared_ptr<Channel>> channels_;  // all of them, to close on a failure
  std::vector<std::unique_ptr<PipelineStage>> stages_;
  std::vector<std::vector<std::unique_ptr<ExpertShard>>> shards_;  // [stage][rank]
  std::vector<std::vector<ExpertLink>> links_;                     // [stage][rank]
  std::vector<std::unique_ptr<PartyOptimizer>> optimizers_;        // stages, then shards
};

}  // namespace moerl
