#include "runtime/parallel/ep_shard.hpp"

#include <algorithm>
#include <array>
#include <cstring>

#include "runtime/error.hpp"
#include "runtime/parallel/pp_optimizer.hpp"

namespace moerl {
namespace {

enum Op : int64_t { kForward = 1, kBackward = 2, kEnd = 3 };
using Header = std::array<int64_t, 4>;  // {op, layer, precision, rows}

void send_header(Channel& c, Op op, int64_t layer, int64_t precision, int64_t rows) {
  const Header h{op, layer, precision, rows};
  c.send(std::span<const int64_t>(h));
}

// The stage's side of one MoE layer: rows of expert e (offsets[e] .. offsets[e+1]) to and from owner(e).
class ExpertDispatcher final : public RoutedExperts {
 public:
  ExpertDispatcher(int64_t layer, int64_t hidden, ExpertPlacement placement, std::vector<ExpertLink> links)
      : layer_(layer), hidden_(hidden), placement_(placement), links_(std::move(links)) {
    placement_.validate("expert dispatcher of MoE layer " + std::to_string(layer));
    require(static_cast<int64_t>(links_.size()) == placement_.shards,
            "expert dispatcher: " + std::to_string(links_.size()) + " links for " +
                std::to_string(placement_.shards) + " shards");
    for (int64_t r = 0; r < placement_.shards; ++r) owned_.push_back(placement_.experts_of(r));
    rows_.assign(links_.size(), 0);
    buffers_.resize(links_.size());
  }

  float* input(const int64_t* offsets) override {
    offsets_.assign(offsets, offsets + placement_.n_experts + 1);
    xp_.resize(static_cast<size_t>(offsets_.back() * hidden_));
    return xp_.data();
  }

  void forward(float* yp, Precision precision) override {
    for (size_t r = 0; r < links_.size(); ++r) {
      std::vector<int64_t> counts;
      for (int64_t e : owned_[r]) counts.push_back(offsets_[e + 1] - offsets_[e]);
      pack(r, xp_.data());
      Channel& out = *links_[r].requests;
      send_header(out, kForward, layer_, static_cast<int64_t>(precision), rows_[r]);
      out.send(std::span<const int64_t>(counts));
      out.send(std::span<const float>(buffers_[r]));
    }
    receive_into(yp);
  }

  void backward(const float* dyp, float* dxp) override {
    for (size_t r = 0; r < links_.size(); ++r) {
      pack(r, dyp);
      Channel& out = *links_[r].requests;
      send_header(out, kBackward, layer_, 0, rows_[r]);
      out.send(std::span<const float>(buffers_[r]));
    }
    receive_into(dxp);
  }

 private:
  // buffers_[r] <- the rows of shard r's experts from src [offsets[E], hidden], expert by expert.
  void pack(size_t r, const float* src) {
    rows_[r] = 0;
    for (int64_t e : owned_[r]) rows_[r] += offsets_[e + 1] - offsets_[e];
    buffers_[r].resize(static_cast<size_t>(rows_[r] * hidden_));
    float* dst = buffers_[r].data();
    for (int64_t e : owned_[r]) {
      const int64_t n = (offsets_[e + 1] - offsets_[e]) * hidden_;
      std::copy_n(src + offsets_[e] * hidden_, n, dst);
      dst += n;
    }
  }
  // Each shard's reply, unpacked into its experts' rows of dst.
  void receive_into(float* dst) {
    for (size_t r = 0; r < links_.size(); ++r) {
      links_[r].replies->recv(std::span<float>(buffers_[r]));
      const float* src = buffers_[r].data();
      for (int64_t e : owned_[r]) {
        const int64_t n = (offsets_[e + 1] - offsets_[e]) * hidden_;
        std::copy_n(src, n, dst + offsets_[e] * hidden_);
        src += n;
      }
    }
  }

  int64_t layer_, hidden_;
  ExpertPlacement placement_;
  std::vector<ExpertLink> links_;
  std::vector<std::vector<int64_t>> owned_;  // [shards] experts of each shard
  std::vector<int64_t> offsets_;             // [E + 1] of the last forward
  std::vector<float> xp_;                    // [offsets[E], hidden] permuted input rows
  std::vector<int64_t> rows_;                // [shards] rows of the last message to each
  std::vector<std::vector<float>> buffers_;  // [shards] packed rows, to and from each
};

}  // namespace

int64_t ExpertPlacement::owner(int64_t e) const {
  require(e >= 0 && e < n_experts, "expert " + std::to_string(e) + " outside 0 .. " + std::to_string(n_experts));
  if (!contiguous) return e % shards;
  const int64_t per = (n_experts + shards - 1) / shards;
  return e / per;
}

std::vector<int64_t> ExpertPlacement::experts_of(int64_t rank) const {
  std::vector<int64_t> out;
  for (int64_t e = 0; e < n_experts; ++e)
    if (owner(e) == rank) out.push_back(e);
  return out;
}

void ExpertPlacement::validate(const std::string& where) const {
  require(n_experts > 0, where + ": expert parallelism needs routed experts (n_routed_experts > 0)");
  require(shards >= 1 && shards <= n_experts, where + ": " + std::to_string(shards) +
                                                  " expert shards, expected 1 .. n_routed_experts = " +
                                                  std::to_string(n_experts));
  for (int64_t r = 0; r < shards; ++r)
    require(!experts_of(r).empty(), where + ": expert shard " + std::to_string(r) + " of " +
                                        std::to_string(shards) + " would own no expert (contiguous ranges of " +
                                        std::to_string(n_experts) + " experts)");
}

std::unique_ptr<RoutedExperts> make_expert_dispatcher(int64_t layer, int64_t hidden, ExpertPlacement placement,
                                                      std::vector<ExpertLink> links) {
  return std::make_unique<ExpertDispatcher>(layer, hidden, placement, std::move(links));
}

void end_expert_step(const std::vector<ExpertLink>& links) {
  for (const ExpertLink& link : links) send_header(*link.requests, kEnd, 0, 0, 0);
}

ExpertShard::ExpertShard(const ModelConfig& config, std::vector<std::string> moe_prefixes, ExpertPlacement placement,
                         int64_t rank)
    : rank_(rank), hidden_(config.hidden_size), prefixes_(std::move(moe_prefixes)) {
  placement.validate("expert shard " + std::to_string(rank));
  require(rank >= 0 && rank < placement.shards, "expert shard: rank " + std::to_string(rank) + " outside 0 .. " +
                                                    std::to_string(placement.shards));
  experts_ = placement.experts_of(rank);
  for (const std::string& prefix : prefixes_)
    groups_.push_back(
        std::make_unique<ExpertGroup>(params_, prefix, experts_, config.hidden_size, config.moe_intermediate_size));
}

ExpertShard::~ExpertShard() = default;

void ExpertShard::load_weights(const Params& source) {
  copy_weights(source, params_, "expert shard " + std::to_string(rank_));
}

ExpertGroup& ExpertShard::group(int64_t layer) {
  require(layer >= 0 && layer < static_cast<int64_t>(groups_.size()),
          "expert shard " + std::to_string(rank_) + ": MoE layer id " + std::to_string(layer) + " outside 0 .. " +
              std::to_string(groups_.size()));
  return *groups_[static_cast<size_t>(layer)];
}

float* ExpertShard::prepare(int64_t layer, const int64_t* counts) { return group(layer).prepare(counts); }
void ExpertShard::forward(int64_t layer, float* yp, Precision precision) { group(layer).forward(yp, precision); }
void ExpertShard::backward(int64_t layer, const float* dyp, float* dxp) { group(layer).backward(dyp, dxp); }
int64_t ExpertShard::rows(int64_t layer) const {
  require(layer >= 0 && layer < static_cast<int64_t>(groups_.size()), "expert shard: no MoE layer " +
                                                                          std::to_string(layer));
  return groups_[static_cast<size_t>(layer)]->rows();
}

int64_t ExpertShard::serve(const ExpertLink& link) {
  const std::string who = "expert shard " + std::to_string(rank_);
  std::vector<int64_t> counts(experts_.size());
  std::vector<float> out, grad;
  for (int64_t served = 0;; ++served) {
    Header h{};
    link.requests->recv(std::span<int64_t>(h));
    const int64_t op = h[0], layer = h[1], rows = h[3];
    if (op == kEnd) return served;
    require(op == kForward || op == kBackward, who + ": unknown request op " + std::to_string(op));
    require(rows >= 0, who + ": negative row count in a request");
    out.resize(static_cast<size_t>(rows * hidden_));
    if (op == kForward) {
      require(h[2] >= 0 && h[2] <= static_cast<int64_t>(Precision::FP8), who + ": unknown precision " +
                                                                              std::to_string(h[2]));
      link.requests->recv(std::span<int64_t>(counts));
      int64_t total = 0;
      for (int64_t n : counts) total += n;
      require(total == rows, who + ": counts add up to " + std::to_string(total) + " rows, the header says " +
                                 std::to_string(rows));
      float* xp = prepare(layer, counts.data());
      link.requests->recv(xp, static_cast<size_t>(rows * hidden_) * sizeof(float));
      forward(layer, out.data(), static_cast<Precision>(h[2]));
    } else {
      require(rows == this->rows(layer), who + ": backward of MoE layer " + std::to_string(layer) + " with " +
                                             std::to_string(rows) + " rows, its last forward had " +
                                             std::to_string(this->rows(layer)));
      grad.resize(static_cast<size_t>(rows * hidden_));
      link.requests->recv(std::span<float>(grad));
      backward(layer, grad.data(), out.data());
    }
    link.replies->send(std::span<const float>(out));
  }
}

}  // namespace moerl
