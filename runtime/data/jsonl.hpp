// Readers for JSON Lines corpora, one record per line (blank lines are skipped):
//   pretraining text     {"text": "..."}                      (other fields, e.g. "id", are ignored)
//   supervised examples  {"prompt": "...", "response": "..."}
//   pre-tokenized        {"input_ids": [1, 2, ...]}             (the HF datasets convention)
// A malformed line is a moerl::Error "FILE:LINE: ..." naming the field that was expected.
#pragma once
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace moerl {

struct SftExample {
  std::string prompt;
  std::string response;
};

// The "text" field of every line, in file order.
std::vector<std::string> read_text_jsonl(const std::filesystem::path& path);
std::vector<SftExample> read_sft_jsonl(const std::filesystem::path& path);
// Token ids must be integers in [0, 2^31).
std::vector<std::vector<int32_t>> read_token_ids_jsonl(const std::filesystem::path& path);

}  // namespace moerl
