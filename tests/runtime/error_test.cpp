// moerl::require (runtime/error.hpp): a failed check throws moerl::Error with its message; the form with a message
// maker calls it only when the check fails, so that checks on per-launch paths cost no string building.
#include <gtest/gtest.h>

#include <string>

#include "runtime/error.hpp"

namespace moerl {
namespace {

TEST(Require, ThrowsErrorWithTheMessageOnlyWhenTheCheckFails) {
  EXPECT_NO_THROW(require(true, "unused"));
  try {
    require(false, std::string("weights.safetensors: tensor ") + "lm_head.weight" + " missing");
    FAIL() << "require(false, ...) returned";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "weights.safetensors: tensor lm_head.weight missing");
  }
}

TEST(Require, MakesALazyMessageOnlyWhenTheCheckFails) {
  int made = 0;
  const auto message = [&] {
    ++made;
    return "input_ids[" + std::to_string(7) + "] = 40000 is outside the vocabulary";
  };
  for (int i = 0; i < 1000; ++i) require(true, message);
  EXPECT_EQ(made, 0) << "a passing check built its message";
  try {
    require(false, message);
    FAIL() << "require(false, maker) returned";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "input_ids[7] = 40000 is outside the vocabulary");
  }
  EXPECT_EQ(made, 1);
}

}  // namespace
}  // namespace moerl
