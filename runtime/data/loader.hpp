// From documents to training batches: a train/validation split by document, a token stream, and
// deterministic, resumable batch loaders for pretraining (fixed windows) and SFT (prompt/response pairs).
//
// Determinism: a loader's batches depend only on its data, its shape and LoaderState{seed, epoch, cursor};
// a loader restored from state() yields exactly the batches the original would have yielded next.
// Permutations use std::mt19937_64 (its output is fixed by the C++ standard) and our own Fisher-Yates, not
// std::shuffle or std::uniform_int_distribution (their results differ between standard libraries).
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "runtime/data/jsonl.hpp"

namespace moerl {

class Tokenizer;

// Label of a position that contributes no loss (prompt tokens, padding): PyTorch's ignore_index, and
// kIgnoreLabel of runtime/model/model.hpp (kept apart so that data does not depend on the model).
constexpr int64_t kNoLossLabel = -100;

// Token ids and next-token labels, [batch, seq] row-major, ready for Model::forward (TokenBatch points
// into these vectors).
struct Batch {
  int64_t batch = 0, seq = 0;
  std::vector<int64_t> input_ids;  // [batch, seq]
  std::vector<int64_t> labels;     // [batch, seq]; kNoLossLabel where no loss is taken
};

// Documents i with i % validation_every == validation_every - 1 go to validation (Brown's 500 documents,
// every 20th: 475 train, 25 validation, spread over all 15 genres since the files are ordered by genre);
// the rest to train. Indices ascending. validation_every 0: everything is train.
struct DocumentSplit {
  std::vector<size_t> train, validation;
};
DocumentSplit split_documents(size_t count, size_t validation_every = 20);

// Concatenated token ids of documents, each `bos ids... eos`.
class TokenStream {
 public:
  TokenStream() = default;
  // Encodes every text, or texts[i] for i in `which` in that order (none when `which` is empty); OpenMP
  // over documents, the same stream for any thread count.
  static TokenStream from_texts(const Tokenizer& tokenizer, std::span<const std::string> texts);
  static TokenStream from_texts(const Tokenizer& tokenizer, std::span<const std::string> texts,
                                std::span<const size_t> which);
  // Pre-tokenized sequences appended as they are (they carry their own bos/eos, if any).
  static TokenStream from_sequences(std::span<const std::vector<int32_t>> sequences);

  void append_document(std::span<const int32_t> ids);  // as given, no bos/eos added
  std::span<const int32_t> tokens() const { return tokens_; }
  int64_t size() const { return static_cast<int64_t>(tokens_.size()); }
  int64_t documents() const { return documents_; }

 private:
  std::vector<int32_t> tokens_;
  int64_t documents_ = 0;
};

// A loader's position. JSON: {"seed": 7, "epoch": 0, "cursor": 12}.
struct LoaderState {
  uint64_t seed = 0;
  int64_t epoch = 0;   // epochs completed
  int64_t cursor = 0;  // batches already yielded in this epoch

  nlohmann::json to_json() const;
  // `source` (a file name) prefixes errors, which name the field.
  static LoaderState from_json(const nlohmann::json& j, const std::string& source);
  bool operator==(const LoaderState&) const = default;
};

// Pretraining batches: windows of seq+1 tokens (inputs = the first seq, labels = the last seq: the inputs
// shifted by one). Epoch e starts its windows at offset_e + k·seq, offset_e in [0, seq) drawn from
// (seed, e), and visits them in a (seed, e)-shuffled order, `batch` windows per batch; the windows that do
// not fill a last batch are skipped (batches never span two epochs). The stream must outlive the loader.
class BatchLoader {
 public:
  BatchLoader(const TokenStream& stream, int64_t batch, int64_t seq, uint64_t seed);

  Batch next();
  LoaderState state() const { return state_; }
  // Throws Error when the cursor lies beyond the epoch's batches (the state is from other data or shape).
  void restore(const LoaderState& state);
  int64_t batches_in_epoch() const { return static_cast<int64_t>(order_.size()) / batch_; }

 private:
  void start_epoch();
  const TokenStream* stream_;
  int64_t batch_, seq_;
  LoaderState state_;
  int64_t offset_ = 0;          // first window start of this epoch
  std::vector<int64_t> order_;  // window indices of this epoch, shuffled
};

// Validation: the fixed windows k·seq (k = 0, 1, ... while a label exists), in order, `batch` per batch;
// the last batch may have fewer rows.
std::vector<Batch> validation_batches(const TokenStream& stream, int64_t batch, int64_t seq);

// An SFT example as tokens: bos, prompt, response, eos. prompt_length counts bos and the prompt.
struct SftSequence {
  std::vector<int32_t> tokens;
  int64_t prompt_length = 0;
};
// Prompt and response are encoded separately (each as if it followed a space) and concatenated.
SftSequence encode_sft(const Tokenizer& tokenizer, const SftExample& example);

// One row per example: inputs tokens[0..L-1), labels tokens[1..L) with kNoLossLabel on every label that is a
// prompt token, so the loss covers the response and eos. Rows longer than max_seq keep their first max_seq
// positions (a row whose prompt fills them has no label); rows are padded (input pad_id, label kNoLossLabel)
// to the longest row, or to max_seq when pad_to_max_seq.
Batch make_sft_batch(std::span<const SftSequence> examples, int32_t pad_id, int64_t max_seq,
                     bool pad_to_max_seq = false);

// SFT batches over examples in a (seed, epoch)-shuffled order; a last partial batch is skipped. Resumable as
// BatchLoader.
class SftLoader {
 public:
  SftLoader(std::vector<SftSequence> examples, int64_t batch, int64_t max_seq, int32_t pad_id, uint64_t seed,
            bool pad_to_max_seq = false);

  Batch next();
  LoaderState state() const { return state_; }
  void restore(const LoaderState& state);
  int64_t batches_in_epoch() const { return static_cast<int64_t>(examples_.size()) / batch_; }

 private:
  std::vector<SftSequence> examples_;
  int64_t batch_, max_seq_;
  int32_t pad_id_;
  bool pad_to_max_seq_;
  LoaderState state_;
  std::vector<int64_t> order_;
};

}  // namespace moerl
