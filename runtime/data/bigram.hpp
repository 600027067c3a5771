// The baseline a pretrained model must beat: an add-one (Laplace) smoothed bigram model over token ids,
//   p(next | prev) = (count(prev, next) + 1) / (count(prev, ·) + vocab_size),
// counted over every consecutive pair of the training stream (document boundaries included: eos -> bos,
// as the model sees them in its windows).
#pragma once
#include <cstdint>
#include <span>
#include <unordered_map>
#include <vector>

#include "runtime/data/loader.hpp"

namespace moerl {

class BigramModel {
 public:
  static BigramModel train(std::span<const int32_t> tokens, int32_t vocab_size);

  // Natural log of p(next | prev).
  double log_prob(int32_t prev, int32_t next) const;
  // Mean of -log p(label | input) over the positions of `batches` that have a label (kNoLossLabel skipped),
  // in nats: comparable with the model's LossReport::loss on the same batches.
  double cross_entropy(std::span<const Batch> batches) const;

  int32_t vocab_size() const { return vocab_size_; }
  int64_t pairs() const { return pairs_; }  // training pairs counted

 private:
  int32_t vocab_size_ = 0;
  int64_t pairs_ = 0;
  std::vector<int64_t> row_totals_;                  // [vocab]: count(prev, ·)
  std::unordered_map<uint64_t, int64_t> counts_;     // prev * vocab + next -> count(prev, next); sparse
};

}  // namespace moerl
