// One tensor-parallel rank of the DeepSeek-V3 model (moerl::Model's forward and backward, block by block),
// over a group of T ranks that all see the same batch:
//   attention   heads split: q_b_proj (q_proj) and kv_b_proj rows by head (column-parallel), o_proj columns
//               by head (row-parallel) + all-reduce of the partial outputs; q_a_proj, kv_a_proj_with_mqa and
//               the norms are whole copies (runtime/model/attention.hpp, TensorSlice)
//   dense FFN   gate/up rows (column-parallel), down columns (row-parallel) + all-reduce (tp_feed_forward.hpp)
//   MoE FFN     replicated: every rank runs the whole layer (router, routed and shared experts) on the same
//               input. Exact and simple; splitting the experts is expert parallelism's job.
//   embedding, norms, LM head, loss: replicated.
// Every rank ends forward with the same loss and backward with the same gradients of the copies, so copies
// stay identical under any optimizer that treats identical inputs identically. All-reduces per layer and
// step: forward [tokens, hidden] after attention (and after a dense FFN); backward [tokens, kv_lora + rope] and
// [tokens, q_lora] (or [tokens, hidden] without query compression) inside attention, and [tokens, hidden]
// after a dense FFN.
// Not supported yet: multi-token prediction (num_nextn_predict_layers must be 0).
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "runtime/model/model.hpp"
#include "runtime/parallel/collectives.hpp"
#include "runtime/parallel/dp_replica.hpp"

namespace moerl {

// How one parameter of a rank relates to the whole model's: a whole copy (axis -1), or the block
// [begin, begin + count) of `full` along axis 0 (rows) or 1 (columns).
struct ShardSpec {
  int axis = -1;
  int64_t begin = 0, count = 0, full = 0;
};

class TensorParallelModel final : public Replica {
 public:
  // Rank tp.rank() of Model(config) split over tp.size() ranks; the group must outlive the model.
  // num_attention_heads and intermediate_size must divide by tp.size().
  TensorParallelModel(ModelConfig config, Collectives& tp);
  ~TensorParallelModel() override;

  // Copies this rank's slices (and the copies) from a whole model's parameters, e.g. Model::init_random's.
  void load_from(const Params& full);
  // Writes this rank's slices and copies into a whole model's parameters; after every rank of the group has
  // written into the same Params (threads), or each into its own (then merged), it holds the whole model.
  void store_into(Params& full) const;
  ShardSpec shard(const std::string& name) const;

  // As Model::forward (no MTP: options.mtp_weight must be 0) and Model::backward.
  LossReport forward(const TokenBatch& batch, const ForwardOptions& options) override;
  void backward() override;
  Params& params() override { return params_; }
  std::vector<ExpertLoad> expert_loads() const override;
  std::vector<std::string> router_bias_names() const override;
  Collectives* tensor_group() override { return &tp_; }
  bool replicated_across_tp(const std::string& name) const override { return shard(name).axis < 0; }

  const ModelConfig& config() const { return config_; }

 private:
  struct Impl;
  ModelConfig config_;
  Collectives& tp_;
  Params params_;
  std::map<std::string, ShardSpec> shards_;  // the sliced parameters; absent names are copies
  std::unique_ptr<Impl> impl_;
};

}  // namespace moerl
