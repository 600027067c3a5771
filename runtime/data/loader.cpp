#include "runtime/data/loader.hpp"

#include <algorithm>
#include <random>

#include <nlohmann/json.hpp>

#include "runtime/data/tokenizer.hpp"
#include "runtime/error.hpp"
#include "runtime/util/splitmix.hpp"

namespace moerl {
namespace {

std::mt19937_64 epoch_rng(uint64_t seed, int64_t epoch) {
  return std::mt19937_64(splitmix64(splitmix64(seed) ^ static_cast<uint64_t>(epoch)));
}

// Uniform in [0, n) without modulo bias.
uint64_t below(std::mt19937_64& rng, uint64_t n) {
  const uint64_t limit = std::mt19937_64::max() - std::mt19937_64::max() % n;
  uint64_t r;
  do r = rng(); while (r >= limit);
  return r % n;
}

// 0..n-1 in a Fisher-Yates order drawn from rng.
std::vector<int64_t> permutation(int64_t n, std::mt19937_64& rng) {
  std::vector<int64_t> order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) order[static_cast<size_t>(i)] = i;
  for (int64_t i = n - 1; i > 0; --i)
    std::swap(order[static_cast<size_t>(i)], order[below(rng, static_cast<uint64_t>(i) + 1)]);
  return order;
}

Batch empty_batch(int64_t rows, int64_t seq) {
  Batch b;
  b.batch = rows;
  b.seq = seq;
  b.input_ids.resize(static_cast<size_t>(rows * seq));
  b.labels.resize(static_cast<size_t>(rows * seq));
  return b;
}

// Row `row` of b from the stream's tokens [start, start + seq + 1).
void fill_window(Batch& b, int64_t row, std::span<const int32_t> tokens, int64_t start) {
  for (int64_t t = 0; t < b.seq; ++t) {
    b.input_ids[static_cast<size_t>(row * b.seq + t)] = tokens[static_cast<size_t>(start + t)];
    b.labels[static_cast<size_t>(row * b.seq + t)] = tokens[static_cast<size_t>(start + t + 1)];
  }
}

}  // namespace

DocumentSplit split_documents(size_t count, size_t validation_every) {
  DocumentSplit split;
  for (size_t i = 0; i < count; ++i) {
    if (validation_every > 0 && i % validation_every == validation_every - 1)
      split.validation.push_back(i);
    else
      split.train.push_back(i);
  }
  return split;
}

TokenStream TokenStream::from_texts(const Tokenizer& tokenizer, std::span<const std::string> texts) {
  std::vector<size_t> all(texts.size());
  for (size_t i = 0; i < texts.size(); ++i) all[i] = i;
  return from_texts(tokenizer, texts, all);
}

TokenStream TokenStream::from_texts(const Tokenizer& tokenizer, std::span<const std::string> texts,
                                    std::span<const size_t> which) {
  for (size_t i : which)
    require(i < texts.size(), "TokenStream: document index " + std::to_string(i) + " outside the " +
                                  std::to_string(texts.size()) + " texts");
  std::vector<std::vector<int32_t>> encoded(which.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t d = 0; d < static_cast<int64_t>(which.size()); ++d)
    encoded[static_cast<size_t>(d)] = tokenizer.encode(texts[which[static_cast<size_t>(d)]]);
  TokenStream stream;
  size_t total = 0;
  for (const auto& ids : encoded) total += ids.size() + 2;
  stream.tokens_.reserve(total);
  for (const auto& ids : encoded) {
    stream.tokens_.push_back(tokenizer.bos_id());
    stream.tokens_.insert(stream.tokens_.end(), ids.begin(), ids.end());
    stream.tokens_.push_back(tokenizer.eos_id());
    ++stream.documents_;
  }
  return stream;
}

TokenStream TokenStream::from_sequences(std::span<const std::vector<int32_t>> sequences) {
  TokenStream stream;
  for (const auto& ids : sequences) stream.append_document(ids);
  return stream;
}

void TokenStream::append_document(std::span<const int32_t> ids) {
  tokens_.insert(tokens_.end(), ids.begin(), ids.end());
  ++documents_;
}

nlohmann::json LoaderState::to_json() const {
  return {{"seed", seed}, {"epoch", epoch}, {"cursor", cursor}};
}

LoaderState LoaderState::from_json(const nlohmann::json& j, const std::string& source) {
  require(j.is_object(), source + ": expected a loader state object {\"seed\", \"epoch\", \"cursor\"}");
  auto field = [&](const char* key) -> const nlohmann::json& {
    auto it = j.find(key);
    require(it != j.end() && (it->is_number_unsigned() || (it->is_number_integer() && *it >= 0)),
            source + ": field \"" + key + "\": expected a non-negative integer" +
                (it == j.end() ? std::string(", it is missing") : ", got " + it->dump()));
    return *it;
  };
  LoaderState s;
  s.seed = field("seed").get<uint64_t>();
  s.epoch = field("epoch").get<int64_t>();
  s.cursor = field("cursor").get<int64_t>();
  return s;
}

BatchLoader::BatchLoader(const TokenStream& stream, int64_t batch, int64_t seq, uint64_t seed)
    : stream_(&stream), batch_(batch), seq_(seq) {
  require(batch > 0 && seq > 0, "BatchLoader: batch and seq must be positive, got batch " +
                                    std::to_string(batch) + ", seq " + std::to_string(seq));
  // The worst offset, seq - 1, must still leave `batch` full windows.
  require(stream.size() >= (batch + 1) * seq,
          "BatchLoader: " + std::to_string(stream.size()) + " tokens are too few for one batch of " +
              std::to_string(batch) + "x" + std::to_string(seq) + " (at least " +
              std::to_string((batch + 1) * seq) + " needed)");
  state_.seed = seed;
  start_epoch();
}

void BatchLoader::start_epoch() {
  std::mt19937_64 rng = epoch_rng(state_.seed, state_.epoch);
  offset_ = static_cast<int64_t>(below(rng, static_cast<uint64_t>(seq_)));
  order_ = permutation((stream_->size() - 1 - offset_) / seq_, rng);
}

Batch BatchLoader::next() {
  if (state_.cursor >= batches_in_epoch()) {
    ++state_.epoch;
    state_.cursor = 0;
    start_epoch();
  }
  Batch b = empty_batch(batch_, seq_);
  for (int64_t r = 0; r < batch_; ++r) {
    const int64_t window = order_[static_cast<size_t>(state_.cursor * batch_ + r)];
    fill_window(b, r, stream_->tokens(), offset_ + window * seq_);
  }
  ++state_.cursor;
  return b;
}

void BatchLoader::restore(const LoaderState& state) {
  const LoaderState before = state_;
  state_ = state;
  start_epoch();
  if (state.cursor <= batches_in_epoch()) return;
  const int64_t batches = batches_in_epoch();
  state_ = before;  // a refused state leaves the loader where it was
  start_epoch();
  throw Error("BatchLoader: saved cursor " + std::to_string(state.cursor) + " lies beyond the " +
              std::to_string(batches) + " batches of epoch " + std::to_string(state.epoch) +
              " (was the state saved with other data, batch or seq?)");
}

std::vector<Batch> validation_batches(const TokenStream& stream, int64_t batch, int64_t seq) {
  require(batch > 0 && seq > 0, "validation_batches: batch and seq must be positive");
  const int64_t windows = stream.size() > 0 ? (stream.size() - 1) / seq : 0;
  require(windows > 0, "validation_batches: " + std::to_string(stream.size()) +
                           " tokens are too few for one window of " + std::to_string(seq));
  std::vector<Batch> batches;
  for (int64_t first = 0; first < windows; first += batch) {
    const int64_t rows = std::min(batch, windows - first);
    Batch b = empty_batch(rows, seq);
    for (int64_t r = 0; r < rows; ++r) fill_window(b, r, stream.tokens(), (first + r) * seq);
    batches.push_back(std::move(b));
  }
  return batches;
}

SftSequence encode_sft(const Tokenizer& tokenizer, const SftExample& example) {
  SftSequence s;
  const std::vector<int32_t> prompt = tokenizer.encode(example.prompt);
  const std::vector<int32_t> response = tokenizer.encode(example.response);
  s.tokens.reserve(prompt.size() + response.size() + 2);
  s.tokens.push_back(tokenizer.bos_id());
  s.tokens.insert(s.tokens.end(), prompt.begin(), prompt.end());
  s.prompt_length = static_cast<int64_t>(s.tokens.size());
  s.tokens.insert(s.tokens.end(), response.begin(), response.end());
  s.tokens.push_back(tokenizer.eos_id());
  return s;
}

Batch make_sft_batch(std::span<const SftSequence> examples, int32_t pad_id, int64_t max_seq,
                     bool pad_to_max_seq) {
  require(!examples.empty() && max_seq > 0, "make_sft_batch: need examples and a positive max_seq");
  auto row_length = [&](const SftSequence& s) {
    return std::min<int64_t>(static_cast<int64_t>(s.tokens.size()) - 1, max_seq);
  };
  int64_t seq = 0;
  for (const SftSequence& s : examples) {
    require(s.tokens.size() >= 2 && s.prompt_length >= 1 &&
                s.prompt_length <= static_cast<int64_t>(s.tokens.size()),
            "make_sft_batch: an example needs at least bos and eos and a prompt_length within its tokens");
    seq = std::max(seq, row_length(s));
  }
  if (pad_to_max_seq) seq = max_seq;
  Batch b = empty_batch(static_cast<int64_t>(examples.size()), seq);
  std::fill(b.input_ids.begin(), b.input_ids.end(), pad_id);
  std::fill(b.labels.begin(), b.labels.end(), kNoLossLabel);
  for (size_t r = 0; r < examples.size(); ++r) {
    const SftSequence& s = examples[r];
    for (int64_t t = 0; t < row_length(s); ++t) {
      const size_t at = r * static_cast<size_t>(seq) + static_cast<size_t>(t);
      b.input_ids[at] = s.tokens[static_cast<size_t>(t)];
      // The label at t is token t + 1: a loss only where that token is past the prompt.
      if (t + 1 >= s.prompt_length) b.labels[at] = s.tokens[static_cast<size_t>(t + 1)];
    }
  }
  return b;
}

SftLoader::SftLoader(std::vector<SftSequence> examples, int64_t batch, int64_t max_seq, int32_t pad_id,
                     uint64_t seed, bool pad_to_max_seq)
    : examples_(std::move(examples)), batch_(batch), max_seq_(max_seq), pad_id_(pad_id),
      pad_to_max_seq_(pad_to_max_seq) {
  require(batch > 0 && max_seq > 0, "SftLoader: batch and max_seq must be positive");
  require(static_cast<int64_t>(examples_.size()) >= batch,
          "SftLoader: " + std::to_string(examples_.size()) + " examples are too few for a batch of " +
              std::to_string(batch));
  restore({seed, 0, 0});
}

Batch SftLoader::next() {
  if (state_.cursor >= batches_in_epoch()) restore({state_.seed, state_.epoch + 1, 0});
  std::vector<SftSequence> rows;
  rows.reserve(static_cast<size_t>(batch_));
  for (int64_t r = 0; r < batch_; ++r)
    rows.push_back(examples_[static_cast<size_t>(order_[static_cast<size_t>(state_.cursor * batch_ + r)])]);
  ++state_.cursor;
  return make_sft_batch(rows, pad_id_, max_seq_, pad_to_max_seq_);
}

void SftLoader::restore(const LoaderState& state) {
  require(state.cursor <= batches_in_epoch(),
          "SftLoader: saved cursor " + std::to_string(state.cursor) + " lies beyond the " +
              std::to_string(batches_in_epoch()) + " batches of an epoch (was the state saved with other data?)");
  state_ = state;
  std::mt19937_64 rng = epoch_rng(state_.seed, state_.epoch);
  order_ = permutation(static_cast<int64_t>(examples_.size()), rng);
}

}  // namespace moerl
