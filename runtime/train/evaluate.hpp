// Mean next-token cross-entropy of a model over a JSONL file of sequences.
#pragma once
#include <filesystem>

#include "kernels/linear.hpp"
#include "runtime/train/checkpoint.hpp"

namespace moerl {

struct EvalResult {
  double loss = 0;     // mean cross-entropy over every predicted position (nats)
  double ppl = 0;      // exp(loss)
  int64_t tokens = 0;  // predicted positions: sum over sequences of (length - 1)
  int64_t sequences = 0;
};

// `data`: {"input_ids": [...]} lines (used as they are) or {"text": "..."} lines (encoded with the
// checkpoint's tokenizer, bos prepended and eos appended). Each sequence is scored on its own, every
// position predicting the next token; sequences longer than max_position_embeddings are an error.
// When `logits_file` is non-empty, the first sequence's input_ids [n] and logits [n, vocab] are written there
// (safetensors) so another implementation can be compared position by position.
EvalResult evaluate_jsonl(const LoadedModel& loaded, const std::filesystem::path& data, Precision precision,
                          const std::filesystem::path& logits_file = {});

}  // namespace moerl
