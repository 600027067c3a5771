// Expert parallelism: the routed experts of a pipeline stage's MoE layers split over expert shards. The
// router, the permutation into expert-major rows and the weighted combine stay on the stage (MoeFeedForward);
// each expert's rows travel to the shard that owns it and its outputs come back into the same rows:
//
//   stage: router -> permute -> [rows of shard 0's experts | rows of shard 1's experts | ...] -> combine
//                                        |  data plane  ^
//   shard r:                     ExpertGroup of layer l: each owned expert's SwiGLU on its rows
//
// Every expert sees the same rows in the same order as in the single model, so outputs, gradients and the
// experts' weight gradients are the single model's bits.
//
// Protocol, per shard and in order (all on the shard's ExpertLink; int64 header {op, layer, precision, rows}):
//   forward:  header, counts [owned experts] (int64), rows [rows, hidden]  ->  reply rows [rows, hidden]
//   backward: header, row gradients [rows, hidden]                          ->  reply [rows, hidden]
//   end:      header only: the stage's step is over, serve() returns.
// Layer ids index the stage's MoE layers (ModelPart::moe_prefixes()). A shard keeps one forward per layer:
// a layer's backward refers to its latest forward (a pipeline stage recomputes a forward before an older
// micro-batch's backward, so this holds under 1F1B too).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/model/config.hpp"
#include "runtime/model/feed_forward.hpp"
#include "runtime/model/params.hpp"
#include "runtime/parallel/data_plane.hpp"

namespace moerl {

// Which shard owns which routed expert.
struct ExpertPlacement {
  int64_t n_experts = 0;
  int64_t shards = 1;
  bool contiguous = false;  // false: shard r owns the e with e % shards == r; true: ranges of ceil(E / shards)
  int64_t owner(int64_t expert) const;
  std::vector<int64_t> experts_of(int64_t rank) const;  // ascending
  // Throws moerl::Error naming `where` unless 1 <= shards <= n_experts (every shard owns an expert).
  void validate(const std::string& where) const;
};

// One shard's two channels with its stage.
struct ExpertLink {
  std::shared_ptr<Channel> requests;  // stage -> shard: headers, counts, rows
  std::shared_ptr<Channel> replies;   // shard -> stage: rows
};

// Stage side: the RoutedExperts of MoE layer `layer` (its index among the stage's MoE layers), sending each
// expert's rows to its owner over links[owner].
std::unique_ptr<RoutedExperts> make_expert_dispatcher(int64_t layer, int64_t hidden, ExpertPlacement placement,
                                                      std::vector<ExpertLink> links);
// Stage side: tells every shard that the step is over.
void end_expert_step(const std::vector<ExpertLink>& links);

class ExpertShard {
 public:
  // Registers, for each MoE layer prefix of the stage (ModelPart::moe_prefixes()), the experts this rank owns:
  // "<prefix>.experts.<e>.{gate,up,down}_proj.weight", published names, in its own params().
  ExpertShard(const ModelConfig& config, std::vector<std::string> moe_prefixes, ExpertPlacement placement,
              int64_t rank);
  ~ExpertShard();
  ExpertShard(const ExpertShard&) = delete;
  ExpertShard& operator=(const ExpertShard&) = delete;

  int64_t rank() const { return rank_; }
  const std::vector<int64_t>& experts() const { return experts_; }
  const std::vector<std::string>& moe_prefixes() const { return prefixes_; }
  Params& params() { return params_; }
  const Params& params() const { return params_; }
  void load_weights(const Params& source);  // by name, from any Params holding them (a whole model's)

  // The compute behind one request, callable without channels: counts [experts().size()] rows per owned
  // expert -> the [rows, hidden] buffer to fill; forward writes yp [rows, hidden]; backward dyp -> dxp.
  float* prepare(int64_t layer, const int64_t* counts);
  void forward(int64_t layer, float* yp, Precision precision);
  void backward(int64_t layer, const float* dyp, float* dxp);
  int64_t rows(int64_t layer) const;

  // Answers the stage's requests on `link` until it ends the step; returns the number of requests served.
  int64_t serve(const ExpertLink& link);

 private:
  ExpertGroup& group(int64_t layer);
  int64_t rank_;
  int64_t hidden_;
  std::vector<std::string> prefixes_;
  std::vector<int64_t> experts_;
  Params params_;
  std::vector<std::unique_ptr<ExpertGroup>> groups_;  // one per MoE layer
};

}  // namespace moerl
