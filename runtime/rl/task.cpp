#include "runtime/rl/task.hpp"

#include <algorithm>
#include <random>

#include "runtime/error.hpp"
#include "runtime/util/splitmix.hpp"

namespace moerl::rl {
namespace {

int64_t operand_range(const AdditionTask& task) {
  require(task.digits >= 1 && task.digits <= 4,
          "addition task: digits must be in 1..4, got " + std::to_string(task.digits));
  int64_t n = 1;
  for (int i = 0; i < task.digits; ++i) n *= 10;
  return n;
}

// The split's salt: a constant, so the held-out pairs are the same in every run and every program.
constexpr uint64_t kSplitSalt = 0x6d6f65726c2d7274ull;

}  // namespace

Problem make_problem(const AdditionTask& task, int64_t a, int64_t b) {
  const int64_t n = operand_range(task);
  require(a >= 0 && a < n && b >= 0 && b < n, "addition task: operands " + std::to_string(a) + ", " +
                                                  std::to_string(b) + " outside [0, " + std::to_string(n) + ")");
  Problem p;
  p.a = a;
  p.b = b;
  auto padded = [&](int64_t x) {  // fixed width: every prompt of a task has the same length
    std::string s = std::to_string(x);
    return std::string(static_cast<size_t>(task.digits) - s.size(), '0') + s;
  };
  p.prompt = padded(a) + "+" + padded(b) + "=";
  p.answer = std::to_string(a + b);
  return p;
}

bool is_held_out(const AdditionTask& task, int64_t a, int64_t b) {
  const int64_t n = operand_range(task);
  return splitmix64(kSplitSalt ^ static_cast<uint64_t>(a * n + b)) % 10 == 0;
}

std::vector<Problem> training_problems(const AdditionTask& task, uint64_t seed, size_t count) {
  const int64_t n = operand_range(task);
  std::mt19937_64 rng(splitmix64(seed));
  std::vector<Problem> out;
  out.reserve(count);
  while (out.size() < count) {
    const int64_t a = static_cast<int64_t>(rng() % static_cast<uint64_t>(n));
    const int64_t b = static_cast<int64_t>(rng() % static_cast<uint64_t>(n));
    if (!is_held_out(task, a, b)) out.push_back(make_problem(task, a, b));
  }
  return out;
}

std::vector<Problem> evaluation_problems(const AdditionTask& task, size_t count) {
  const int64_t n = operand_range(task);
  std::vector<std::pair<uint64_t, int64_t>> keyed;  // (shuffle key, pair index)
  for (int64_t i = 0; i < n * n; ++i)
    if (is_held_out(task, i / n, i % n)) keyed.emplace_back(splitmix64(static_cast<uint64_t>(i) + 1), i);
  std::sort(keyed.begin(), keyed.end());
  std::vector<Problem> out;
  for (size_t k = 0; k < keyed.size() && out.size() < count; ++k)
    out.push_back(make_problem(task, keyed[k].second / n, keyed[k].second % n));
  return out;
}

std::vector<int32_t> task_encode(std::string_view text) {
  std::vector<int32_t> ids;
  ids.reserve(text.size());
  for (char c : text) {
    if (c >= '0' && c <= '9')
      ids.push_back(3 + (c - '0'));
    else if (c == '+')
      ids.push_back(13);
    else if (c == '=')
      ids.push_back(14);
    else
      require(false, std::string("addition task: character '") + c + "' is not in the task's vocabulary (0-9 + =)");
  }
  return ids;
}

std::string task_decode(std::span<const int32_t> ids) {
  std::string s;
  for (int32_t id : ids) {
    require(id >= 0 && id < 15, "addition task: id " + std::to_string(id) + " is outside the task's vocabulary");
    if (id >= 3 && id <= 12)
      s += static_cast<char>('0' + (id - 3));
    else if (id == 13)
      s += '+';
    else if (id == 14)
      s += '=';
  }
  return s;
}

bool check_answer(const Problem& p, std::span<const int32_t> response) {
  const auto end = std::find(response.begin(), response.end(), kTaskEos);
  const std::span<const int32_t> body(response.begin(), end);
  for (int32_t id : body)
    if (id < 3 || id > 12) return false;  // only digits may precede eos
  return task_decode(body) == p.answer;
}

SftExample sft_example(const Problem& p) {
  SftExample e;
  e.ids = prompt_ids(p);
  e.prompt_tokens = static_cast<int64_t>(e.ids.size());
  for (int32_t id : task_encode(p.answer)) e.ids.push_back(id);
  e.ids.push_back(kTaskEos);
  return e;
}

std::vector<int32_t> prompt_ids(const Problem& p) {
  std::vector<int32_t> ids{kTaskBos};
  for (int32_t id : task_encode(p.prompt)) ids.push_back(id);
  return ids;
}

}  // namespace moerl::rl
