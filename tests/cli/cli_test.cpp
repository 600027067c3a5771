// The command line's contract: help that explains, exit code 2 for bad usage, 1 and one line for failures.
#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "runtime/safetensors.hpp"
#include "tests/support/run_command.hpp"

namespace moerl {
namespace {

using testing::run_command;
const std::string kMoerl = MOERL_BINARY;
const std::string kFixtures = MOERL_TEST_FIXTURES;

TEST(Cli, HelpListsEveryCommandAndExitsZero) {
  const auto r = run_command(kMoerl + " --help");
  EXPECT_EQ(r.exit_code, 0);
  for (const char* cmd : {"run", "eval", "bench"}) EXPECT_NE(r.out.find(cmd), std::string::npos) << cmd;
}

TEST(Cli, CommandHelpExplainsItsOptions) {
  const auto r = run_command(kMoerl + " eval --help");
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_NE(r.out.find("--precision"), std::string::npos);
  EXPECT_NE(r.out.find("--data"), std::string::npos);
}

TEST(Cli, UnknownSubcommandPrintsUsageAndExitsTwo) {
  const auto r = run_command(kMoerl + " frobnicate");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE((r.out + r.err).find("Usage"), std::string::npos);
}

TEST(Cli, UnknownFlagPrintsUsageAndExitsTwo) {
  const auto r = run_command(kMoerl + " eval x --data y --no-such-flag");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE((r.out + r.err).find("Usage"), std::string::npos);
}

TEST(Cli, NoSubcommandIsBadUsage) {
  EXPECT_EQ(run_command(kMoerl).exit_code, 2);
}

TEST(Cli, RuntimeFailureExitsOneWithOneClearLine) {
  const auto r = run_command(kMoerl + " eval /nonexistent/ckpt --data /nonexistent/data.jsonl");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_EQ(r.err.rfind("moerl: error: /nonexistent/ckpt", 0), 0u) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
}

TEST(Cli, EvalReproducesTheHfLossOfTheTinyFixture) {
  // The fixture's 2 sequences of 49 tokens (input_ids then the last label): 96 predicted positions.
  const auto r = run_command(kMoerl + " eval " + kFixtures + "/deepseek-v3-tiny --data " + kFixtures +
                             "/deepseek-v3-tiny-eval.jsonl");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  const double hf_loss = read_safetensors(kFixtures + "/deepseek-v3-tiny/reference.safetensors").at("loss").data<float>()[0];
  EXPECT_EQ(j.at("tokens").get<int64_t>(), 96);
  EXPECT_LT(std::abs(j.at("loss").get<double>() - hf_loss) / hf_loss, 1e-5);  // the fixture's FP32 bound
  EXPECT_NEAR(j.at("ppl").get<double>(), std::exp(j.at("loss").get<double>()), 1e-9 * j.at("ppl").get<double>());
}

}  // namespace
}  // namespace moerl
