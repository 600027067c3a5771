// The verifiable task of the RLHF quickstart: addition of two n-digit numbers written as text,
//   prompt "12+34="   answer "46"   (then end of sequence); operands zero-padded ("05+34=", answer "39"), so
//   every prompt of a task has the same length (a batch of prompts decodes in step)
// with an exact checker that knows nothing of any reward model. Problems come from a deterministic generator;
// a fixed tenth of all (a, b) pairs, chosen by a hash, is held out for evaluation and never appears among the
// training prompts (SFT data and RL prompts alike), whatever the seed.
// The task has its own character vocabulary (16 ids) so a tiny model can learn it: bos 0, eos 1, pad 2 (the
// ids of ModelConfig's and Tokenizer's defaults), digits '0'..'9' -> 3..12, '+' -> 13, '=' -> 14.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moerl::rl {

constexpr int32_t kTaskBos = 0, kTaskEos = 1, kTaskPad = 2;
constexpr int64_t kTaskVocab = 16;  // ids 0..14 used; 16 keeps the head's width even

struct AdditionTask {
  int digits = 2;  // each operand is uniform in [0, 10^digits); 1..4
};

struct Problem {
  int64_t a = 0, b = 0;
  std::string prompt;  // "a+b=", operands zero-padded to `digits`
  std::string answer;  // decimal a + b, no leading zeros
};

Problem make_problem(const AdditionTask& task, int64_t a, int64_t b);
// Whether (a, b) belongs to the held-out evaluation split (about 10% of the pairs; depends only on a, b).
bool is_held_out(const AdditionTask& task, int64_t a, int64_t b);
// `count` training problems drawn (with repetition) from the non-held-out pairs, deterministic in `seed`.
std::vector<Problem> training_problems(const AdditionTask& task, uint64_t seed, size_t count);
// The first `count` held-out problems in a fixed shuffled order (independent of any seed); count is capped at
// the split's size.
std::vector<Problem> evaluation_problems(const AdditionTask& task, size_t count);

// Character ids of `text` (digits, '+', '='); any other character is an Error naming it.
std::vector<int32_t> task_encode(std::string_view text);
// Text of ids; bos, eos and pad decode to nothing; an id outside the vocabulary is an Error.
std::string task_decode(std::span<const int32_t> ids);

// The exact checker: the response up to its first eos (or all of it) decodes to exactly the answer.
bool check_answer(const Problem& problem, std::span<const int32_t> response_ids);
// 1 when check_answer holds, else 0: the verifiable reward.
inline float task_reward(const Problem& p, std::span<const int32_t> response_ids) {
  return check_answer(p, response_ids) ? 1.0f : 0.0f;
}

// SFT example: ids = bos + prompt + answer + eos, the prompt's length (bos included) = prompt_tokens.
struct SftExample {
  std::vector<int32_t> ids;
  int64_t prompt_tokens = 0;
};
SftExample sft_example(const Problem& p);
// Prompt ids for generation: bos + prompt.
std::vector<int32_t> prompt_ids(const Problem& p);

}  // namespace moerl::rl
