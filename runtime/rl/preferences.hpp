// Preference pairs in the HF TRL "chosen/rejected" JSON Lines form, one pair a line:
//   {"prompt": "12+34=", "chosen": "46", "rejected": "47"}
// (the form the feedback store's export writes; extra fields such as "id" or "annotator" are ignored).
// Pairs reach a reward_model or dpo stage three ways: judged over the feedback endpoint's HTTP API by a scripted
// annotator or by people (a `preferences` stage, runtime/train/rl_collect.hpp; what the quickstart does), from a
// file in this form (`data:`, e.g. the feedback store's export), or, with neither, machine-judged here: two
// responses to a prompt, the preferred one picked by the task's exact checker (judge_by_checker).
#pragma once
#include <cstdint>
#include <filesystem>
#include <functional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

namespace moerl {

struct PreferencePair {
  std::string prompt;
  std::string chosen;    // the preferred response (without the prompt)
  std::string rejected;
};

// Every pair of `path` in file order; blank lines skipped. A malformed line is a moerl::Error
// "FILE:LINE: field ..." naming the missing or mistyped field.
std::vector<PreferencePair> read_preferences(const std::filesystem::path& path);
// Writes all pairs (creating the parent folder), via a temporary file and a rename.
void write_preferences(const std::filesystem::path& path, const std::vector<PreferencePair>& pairs);

// Two candidate responses to one prompt, not yet judged.
struct Candidates {
  std::string prompt, a, b;
};
// An exact checker: is `response` a correct answer to `prompt`?
using AnswerChecker = std::function<bool(const std::string& prompt, const std::string& response)>;

// Machine judgement: a pair for every candidate pair where exactly one response is correct (that one is
// chosen); ties (both right or both wrong) carry no preference and are dropped. Order kept.
std::vector<PreferencePair> judge_by_checker(const std::vector<Candidates>& candidates, const AnswerChecker& check);

// A wrong answer near a right one, for "one correct, one corrupted" pairs: one decimal digit of `answer`
// replaced by another digit (or, when it has no digit, a digit appended). Deterministic in `rng`.
std::string corrupt_digits(const std::string& answer, std::mt19937_64& rng);

// One scored sequence: bos, the encoded prompt, the encoded response, eos. Prompt and response are encoded
// separately, as the policy saw them in SFT and generated them (a SentencePiece encoder adds its word-start piece
// to each: encode("07+35=42") and encode("07+35=") + encode("42") differ, and a reward model reading the joined
// form sees sequences its policy backbone never saw). The reward model sums its head over the response's tokens
// (eos included), from `response_start` on.
struct ScoredTokens {
  std::vector<int32_t> ids;
  int64_t response_start = 0;  // index in ids of the response's first token (1 + the prompt's tokens)
};
using TextEncoder = std::function<std::vector<int32_t>(std::string_view)>;
ScoredTokens preference_tokens(const TextEncoder& encode, const std::string& prompt, const std::string& response,
                               int32_t bos_id, int32_t eos_id);

}  // namespace moerl
