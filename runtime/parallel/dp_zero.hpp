// ZeRO-1 AdamW: the optimizer state sharded over the R replicas of a data-parallel group.
//
// The trainable parameters (name order, as AdamW) are flattened into one vector of N elements; replica r
// owns the contiguous shard even_counts(N, R)[r] and keeps the BF16 moments of that shard only (1/R of
// AdamW's). One step:
//   1. reduce-scatter the replicas' gradients (each multiplied by its grad_weight): every replica receives
//      the summed gradient of its own shard;
//   2. global L2 norm: each replica's shard sum of squares (double), all-reduced over the data group and,
//      under tensor parallelism, over the tensor group too, where a parameter copied on every TP rank is
//      counted by TP rank 0 only; clipping to clip_grad_norm as AdamW does, once for all;
//   3. AdamW's per-element update on the shard (runtime/optim/adamw_shard.hpp: AdamW::step's arithmetic,
//      decay on tensors of rank >= 2 only);
//   4. all-gather the updated shards: every replica ends with the same parameters.
// Identical to AdamW::step on the summed gradient up to the summation order of the gradient norm.
// A non-finite norm skips the step on every replica (weights, moments and step count unchanged).
// The replicas' own Params gradients are read, never written (unlike AdamW, which clips them in place).
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "runtime/model/params.hpp"
#include "runtime/optim/adamw.hpp"
#include "runtime/parallel/collectives.hpp"
#include "runtime/safetensors.hpp"
#include "runtime/tensor.hpp"

namespace moerl {

struct ZeroOptions {
  // Under tensor parallelism: the group the parameters are split over, and which of them are whole copies
  // (identical on every TP rank). Null: no tensor parallelism.
  Collectives* tensor_group = nullptr;
  std::function<bool(const std::string&)> replicated_across_tp;
};

class ZeroAdamW {
 public:
  // `params` (this replica's) and `data_group` must outlive the optimizer; every replica's params have
  // the same trainable names and shapes.
  ZeroAdamW(Params& params, AdamWConfig config, Collectives& data_group, ZeroOptions options = {});

  // One step at learning_rate(config, step) (0-based training step). grad_weight multiplies this replica's
  // gradients before the sum over replicas: n_r / N for a loss that is a mean over N counted tokens of
  // which this replica saw n_r. Collective: every replica calls it.
  StepStats step(int64_t step, float grad_weight = 1.0f);

  int64_t steps_taken() const { return t_; }
  const AdamWConfig& config() const { return config_; }
  size_t total() const { return total_; }         // N, trainable elements
  size_t shard_begin() const { return begin_; }   // this replica's shard [begin, end)
  size_t shard_end() const { return end_; }

  // For checkpoints, one file per replica: "optimizer.zero.exp_avg" and "optimizer.zero.exp_avg_sq" (BF16
  // [end - begin]), "optimizer.zero.shard" (I64 [3]: begin, end, N) and "optimizer.step" (I64 [1]).
  std::map<std::string, const Tensor*> state() const;
  // Restores what state() wrote for the same shard. Throws moerl::Error naming the file and tensor when one
  // is missing or does not fit this shard; nothing changes then.
  void load_state(const SafeTensors& saved);

 private:
  struct Slot {
    Param* param;
    size_t offset;    // in the flattened vector
    size_t numel;
    bool in_norm;     // counted in the global norm by this rank
  };
  Params& params_;
  AdamWConfig config_;
  Collectives& dp_;
  ZeroOptions options_;
  std::vector<Slot> slots_;
  std::vector<size_t> counts_;  // shard sizes of all replicas
  size_t total_ = 0, begin_ = 0, end_ = 0;
  Tensor exp_avg_, exp_avg_sq_;  // BF16 [end - begin]
  Tensor shard_tensor_;          // I64 [3]
  Tensor step_tensor_;           // I64 [1]
  int64_t t_ = 0;
  std::vector<float> flat_;      // [N] scratch: gradients out, parameters back
  std::vector<float> grad_;      // [end - begin] summed gradient of the shard
};

}  // namespace moerl
