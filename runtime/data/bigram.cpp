#include "runtime/data/bigram.hpp"

#include <cmath>
#include <string>

#include "runtime/error.hpp"

namespace moerl {

BigramModel BigramModel::train(std::span<const int32_t> tokens, int32_t vocab_size) {
  require(vocab_size > 0, "BigramModel: vocab_size must be positive");
  BigramModel m;
  m.vocab_size_ = vocab_size;
  m.row_totals_.assign(static_cast<size_t>(vocab_size), 0);
  for (size_t i = 0; i < tokens.size(); ++i)
    require(tokens[i] >= 0 && tokens[i] < vocab_size,
            "BigramModel: training token " + std::to_string(i) + " is " + std::to_string(tokens[i]) +
                ", outside [0, " + std::to_string(vocab_size) + ")");
  for (size_t i = 0; i + 1 < tokens.size(); ++i) {
    ++m.counts_[static_cast<uint64_t>(tokens[i]) * static_cast<uint64_t>(vocab_size) +
                static_cast<uint64_t>(tokens[i + 1])];
    ++m.row_totals_[static_cast<size_t>(tokens[i])];
    ++m.pairs_;
  }
  return m;
}

double BigramModel::log_prob(int32_t prev, int32_t next) const {
  require(prev >= 0 && prev < vocab_size_ && next >= 0 && next < vocab_size_,
          "BigramModel: token pair (" + std::to_string(prev) + ", " + std::to_string(next) + ") outside [0, " +
              std::to_string(vocab_size_) + ")");
  auto it = counts_.find(static_cast<uint64_t>(prev) * static_cast<uint64_t>(vocab_size_) +
                         static_cast<uint64_t>(next));
  const double pair = it == counts_.end() ? 0.0 : static_cast<double>(it->second);
  return std::log((pair + 1.0) /
                  (static_cast<double>(row_totals_[static_cast<size_t>(prev)]) + vocab_size_));
}

double BigramModel::cross_entropy(std::span<const Batch> batches) const {
  double sum = 0;  // in order, one thread: the same number every run
  int64_t counted = 0;
  for (const Batch& b : batches) {
    for (size_t i = 0; i < b.labels.size(); ++i) {
      if (b.labels[i] == kNoLossLabel) continue;
      sum -= log_prob(static_cast<int32_t>(b.input_ids[i]), static_cast<int32_t>(b.labels[i]));
      ++counted;
    }
  }
  require(counted > 0, "BigramModel: the batches have no labelled position");
  return sum / static_cast<double>(counted);
}

}  // namespace moerl
