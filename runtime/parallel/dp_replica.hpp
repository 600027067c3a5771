// What a data-parallel replica trains: a whole Model, or one tensor-parallel rank of one
// (runtime/parallel/tp_model.hpp). The data-parallel trainer (dp_trainer.hpp) only needs this surface.
#pragma once
#include <string>
#include <vector>

#include "runtime/model/model.hpp"
#include "runtime/parallel/collectives.hpp"

namespace moerl {

class Replica {
 public:
  virtual ~Replica() = default;
  // Model::forward / Model::backward on this replica's slice of the batch.
  virtual LossReport forward(const TokenBatch& batch, const ForwardOptions& options) = 0;
  virtual void backward() = 0;
  virtual Params& params() = 0;
  // Expert load of each MoE layer from the last forward, and the names of their router bias buffers
  // (e_score_correction_bias), in the same order.
  virtual std::vector<ExpertLoad> expert_loads() const = 0;
  virtual std::vector<std::string> router_bias_names() const = 0;
  // The tensor-parallel group this replica's parameters are split over (null: none), and whether a
  // parameter is a whole copy, identical on every rank of it (counted once in the global gradient norm)
  // rather than a slice.
  virtual Collectives* tensor_group() { return nullptr; }
  virtual bool replicated_across_tp(const std::string& /*name*/) const { return true; }
};

// A whole Model as a replica.
class ModelReplica final : public Replica {
 public:
  explicit ModelReplica(Model& model) : model_(model) {}
  LossReport forward(const TokenBatch& batch, const ForwardOptions& options) override {
    return model_.forward(batch, options);
  }
  void backward() override { model_.backward(); }
  Params& params() override { return model_.params(); }
  std::vector<ExpertLoad> expert_loads() const override { return model_.expert_loads(); }
  std::vector<std::string> router_bias_names() const override;
  Model& model() { return model_; }

 private:
  Model& model_;
};

// "model.layers.N.mlp.gate.e_score_correction_bias" of every MoE layer of `config` in Model::expert_loads()
// order: the main layers, then the MTP layer when there is one.
std::vector<std::string> router_bias_names(const ModelConfig& config);

}  // namespace moerl
