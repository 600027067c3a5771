// Data parallelism on the GPUs of one process: R replicas of a GpuModel, replica r on device r and driven by its
// own thread, each on its slice of every batch (slice_batch, as the CPU's DataParallelTrainer), stepping
// together so that a step equals the single model's step on the whole batch up to FP32 summation order:
//   forward on the slice; the token counts summed over replicas (on the host: all replicas are in this process);
//   backward, the gradient scaled by n_r / N (n_r counted tokens of the slice, N of the batch);
//   ZeRO-1 AdamW: the flat FP32 gradient allocation reduce-scattered over NCCL (replica r receives the summed
//   gradient of its 1/R shard), a GpuAdamW over the shard only (BF16 moments for 1/R of the parameters), the
//   global gradient norm all-reduced from the shards' partial sums, then the updated shards all-gathered into
//   every replica's flat parameter allocation;
//   router-bias balancing from the expert loads summed over replicas.
// The loss weighting is exact for the cross-entropy; the MTP loss and the sequence-wise balance loss get the
// same weight, exact when every slice counts the same number of tokens per sequence (dp_trainer.hpp says why).
//
// The shards are equal slices of GpuModel's flat allocation (padded to R x 256 bytes), cut across tensors: a
// tensor may be split between replicas, each part updated with the tensor's decay rule. optimizer_state()
// reassembles AdamW::state()'s per-tensor moments, so checkpoints are the single-GPU (and CPU) format.
//
//   GpuDataParallel dp(config, 2);               // devices 0 and 1
//   dp.upload(host.params()); dp.start_stage(adamw);
//   dp.zero_grad(); dp.forward(batch, options); dp.backward(); dp.optimizer_step(step);
#pragma once
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "runtime/model/model.hpp"
#include "runtime/optim/adamw.hpp"
#include "runtime/safetensors.hpp"
#include "runtime/tensor.hpp"

namespace moerl::gpu {

class GpuModel;

class GpuDataParallel {
 public:
  // `replicas` GpuModels of `config` (zero parameters) on devices 0 .. replicas - 1, and their NCCL
  // communicators. Throws moerl::Error when fewer devices are visible. `timeout` bounds every collective wait.
  GpuDataParallel(const ModelConfig& config, int replicas,
                  std::chrono::milliseconds timeout = std::chrono::minutes(5));
  ~GpuDataParallel();
  GpuDataParallel(const GpuDataParallel&) = delete;
  GpuDataParallel& operator=(const GpuDataParallel&) = delete;

  int replicas() const;
  const ModelConfig& config() const;

  // Every replica's parameters from host Params (GpuModel::upload); replica 0's into host Params.
  void upload(const Params& host);
  void download(Params& host);

  // A fresh ZeRO-1 optimizer on every replica (zero moments for its shard).
  void start_stage(const AdamWConfig& config);
  // As TrainingBackend. forward slices `batch` over the replicas (every replica needs a sequence: batch >=
  // replicas, else an evaluation forward runs on replica 0 alone and a training forward throws) and returns the
  // report of the whole batch; expert_loads() sums the replicas' loads; update_router_bias applies that sum.
  void zero_grad();
  LossReport forward(const TokenBatch& batch, const ForwardOptions& options);
  void backward();
  StepStats optimizer_step(int64_t step);
  std::vector<ExpertLoad> expert_loads() const;
  void update_router_bias(float gamma);

  // AdamW::state()'s tensors (whole moments per trainable parameter, BF16, and optimizer.step), gathered from
  // the shards; load_optimizer_state takes the same (AdamW::load_state's checks and messages).
  std::map<std::string, Tensor> optimizer_state();
  void load_optimizer_state(const SafeTensors& state);
  const AdamWConfig& optimizer_config() const;

  // Diagnostics and tests: the BF16 moment elements replica r's optimizer holds (each moment), and the
  // trainable elements of the model.
  size_t moment_elements(int replica) const;
  size_t trainable_elements() const;
  // Runs fn(r, replica r's model) on every replica's thread (its device current), concurrently; e.g. a benchmark
  // initialising the weights on the devices (the same on every replica: the caller's duty).
  void each_model(const std::function<void(int, GpuModel&)>& fn);
  // A host copy of replica r's flat parameter allocation (GpuModel::flat_values), e.g. to compare replicas.
  std::vector<float> flat_values(int replica);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moerl::gpu
