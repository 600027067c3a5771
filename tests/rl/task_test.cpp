#include "runtime/rl/task.hpp"

#include <set>

#include <gtest/gtest.h>

#include "runtime/error.hpp"

namespace moerl::rl {
namespace {

TEST(AdditionTask, WritesZeroPaddedPromptsAndPlainAnswers) {
  const Problem p = make_problem(AdditionTask{}, 5, 98);
  EXPECT_EQ(p.prompt, "05+98=");
  EXPECT_EQ(p.answer, "103");
  EXPECT_EQ(task_decode(task_encode("05+98=103")), "05+98=103");
  const SftExample e = sft_example(p);
  EXPECT_EQ(e.prompt_tokens, 7);  // bos + 6 characters
  ASSERT_EQ(e.ids.size(), 11u);   // + 3 answer digits + eos
  EXPECT_EQ(e.ids.front(), kTaskBos);
  EXPECT_EQ(e.ids.back(), kTaskEos);
  EXPECT_THROW(task_encode("1-2"), Error);
}

TEST(AdditionTask, GeneratesTheSameProblemsFromTheSameSeed) {
  const auto a = training_problems(AdditionTask{}, 7, 50), b = training_problems(AdditionTask{}, 7, 50);
  const auto c = training_problems(AdditionTask{}, 8, 50);
  ASSERT_EQ(a.size(), 50u);
  int same_as_other_seed = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].prompt, b[i].prompt);
    same_as_other_seed += a[i].prompt == c[i].prompt;
  }
  EXPECT_LT(same_as_other_seed, 5);
}

TEST(AdditionTask, NeverTrainsOnAHeldOutPair) {
  const AdditionTask task;
  const auto eval = evaluation_problems(task, 100000);
  // About a tenth of the 10^4 pairs; the bound is loose (binomial sd ~30).
  EXPECT_GT(eval.size(), 850u);
  EXPECT_LT(eval.size(), 1150u);
  std::set<std::string> held;
  for (const Problem& p : eval) held.insert(p.prompt);
  for (uint64_t seed = 0; seed < 4; ++seed)
    for (const Problem& p : training_problems(task, seed, 2000)) EXPECT_EQ(held.count(p.prompt), 0u) << p.prompt;
  EXPECT_EQ(evaluation_problems(task, 20)[3].prompt, eval[3].prompt);  // a prefix of the same fixed order
}

TEST(AdditionTask, CheckerAcceptsExactlyTheAnswer) {
  const Problem p = make_problem(AdditionTask{}, 12, 34);
  auto ids = [](std::string s, bool eos) {
    auto v = task_encode(s);
    if (eos) v.push_back(kTaskEos);
    return v;
  };
  EXPECT_TRUE(check_answer(p, ids("46", true)));
  EXPECT_TRUE(check_answer(p, ids("46", false)));
  std::vector<int32_t> after_eos = ids("46", true);
  after_eos.push_back(5);  // whatever follows the eos is not part of the answer
  EXPECT_TRUE(check_answer(p, after_eos));
  EXPECT_FALSE(check_answer(p, ids("47", true)));
  EXPECT_FALSE(check_answer(p, ids("046", true)));
  EXPECT_FALSE(check_answer(p, ids("4", true)));
  EXPECT_FALSE(check_answer(p, ids("46+", true)));
  EXPECT_FALSE(check_answer(p, {}));
  EXPECT_EQ(task_reward(p, ids("46", true)), 1.0f);
  EXPECT_EQ(task_reward(p, ids("45", true)), 0.0f);
}

}  // namespace
}  // namespace moerl::rl
