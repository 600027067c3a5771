#include "runtime/parallel/dp_trainer.hpp"

#include "runtime/error.hpp"

namespace moerl {

std::vector<std::string> router_bias_names(const ModelConfig& config) {
  std::vector<std::string> names;
  auto add = [&](int64_t layer) {
    if (config.is_moe_layer(layer))
      names.push_back("model.layers." + std::to_string(layer) + ".mlp.gate.e_score_correction_bias");
  };
  for (int64_t l = 0; l < config.num_hidden_layers; ++l) add(l);
  if (config.num_nextn_predict_layers > 0) add(config.num_hidden_layers);
  return names;
}

std::vector<std::string> ModelReplica::router_bias_names() const { return moerl::router_bias_names(model_.config()); }

TokenBatch slice_batch(const TokenBatch& batch, int rank, int ranks) {
  require(rank >= 0 && rank < ranks, "slice_batch: rank " + std::to_string(rank) + " outside [0, " +
                                         std::to_string(ranks) + ")");
  const std::vector<size_t> counts = even_counts(static_cast<size_t>(batch.batch), ranks);
  int64_t begin = 0;
  for (int r = 0; r < rank; ++r) begin += static_cast<int64_t>(counts[r]);
  TokenBatch s = batch;
  s.input_ids = batch.input_ids + begin * batch.seq;
  s.labels = batch.labels + begin * batch.seq;
  s.batch = static_cast<int64_t>(counts[rank]);
  return s;
}

namespace {
ZeroOptions zero_options(Replica& replica) {
  ZeroOptions o;
  o.tensor_group = replica.tensor_group();
  if (o.tensor_group) o.replicated_across_tp = [&replica](const std::string& name) {
    return replica.replicated_across_tp(name);
  };
  return o;
}
}  // namespace

DataParallelTrainer::DataParallelTrainer(Replica& replica, Collectives& data_group, AdamWConfig config)
    : replica_(replica), dp_(data_group), optimizer_(replica.params(), config, data_group, zero_options(replica)) {}

DpStepReport DataParallelTrainer::step(const TokenBatch& slice, const ForwardOptions& options, int64_t step,
                                       float bias_gamma) {
  require(options.for_backward, "data-parallel step: the forward options must keep for_backward");
  replica_.params().zero_grad();
  const LossReport local = replica_.forward(slice, options);

  // This replica's share of the global mean: n_r / N (equal shares when no token is counted anywhere).
  double global_tokens = static_cast<double>(local.tokens);
  dp_.allreduce_sum(&global_tokens, 1);
  const double weight = global_tokens > 0 ? static_cast<double>(local.tokens) / global_tokens : 1.0 / dp_.size();
  replica_.backward();

  DpStepReport report;
  double fields[4] = {weight * local.loss, weight * local.mtp_loss, weight * local.balance_loss, weight * local.total};
  dp_.allreduce_sum(fields, 4);
  report.loss.loss = fields[0];
  report.loss.mtp_loss = fields[1];
  report.loss.balance_loss = fields[2];
  report.loss.total = fields[3];
  report.loss.tokens = static_cast<int64_t>(global_tokens);
  report.optimizer = optimizer_.step(step, static_cast<float>(weight));

  if (bias_gamma > 0) {
    // Model::update_router_bias's rule on the load summed over replicas: bias_e += γ·sign(mean - load_e).
    const std::vector<ExpertLoad> loads = replica_.expert_loads();
    const std::vector<std::string> names = replica_.router_bias_names();
    require(loads.size() == names.size(), "data-parallel step: " + std::to_string(loads.size()) +
                                              " expert loads for " + std::to_string(names.size()) + " routers");
    std::vector<double> counts;  // token counts: exact in double
    for (const ExpertLoad& l : loads)
      for (int64_t n : l.tokens_per_expert) counts.push_back(static_cast<double>(n));
    dp_.allreduce_sum(counts.data(), counts.size());
    size_t at = 0;
    for (size_t i = 0; i < loads.size(); ++i) {
      Param& bias = replica_.params().at(names[i]);
      const int64_t E = bias.value.numel();
      require(static_cast<size_t>(E) == loads[i].tokens_per_expert.size(),
              "data-parallel step: " + names[i] + " has " + std::to_string(E) + " experts, the load " +
                  std::to_string(loads[i].tokens_per_expert.size()));
      int64_t total = 0;
      for (int64_t e = 0; e < E; ++e) total += static_cast<int64_t>(counts[at + e]);
      float* b = bias.value.data<float>();
      for (int64_t e = 0; e < E; ++e) {
        const int64_t diff = total - E * static_cast<int64_t>(counts[at + e]);
        b[e] += bias_gamma * static_cast<float>((diff > 0) - (diff < 0));
      }
      at += static_cast<size_t>(E);
    }
  }
  return report;
}

}  // namespace moerl
