// The command line's contract: help that explains, exit code 2 for bad usage, 1 and one line for failures.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
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

// The last line of a usage error: what was wrong (the usage above it may be long).
std::string last_line(const std::string& text) {
  const std::string t = text.ends_with('\n') ? text.substr(0, text.size() - 1) : text;
  return t.substr(t.rfind('\n') + 1);
}

TEST(Cli, UnknownSubcommandPrintsUsageAndExitsTwo) {
  const auto r = run_command(kMoerl + " frobnicate");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE((r.out + r.err).find("Usage"), std::string::npos);
  EXPECT_EQ(last_line(r.err), "moerl: error: 'frobnicate' is not a command (run, eval, bench, head, node, feedback)");
}

TEST(Cli, BadOptionValueEndsWithTheErrorAfterTheUsage) {
  const auto r = run_command(kMoerl + " head --port 99999");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("--port"), std::string::npos);
  EXPECT_EQ(last_line(r.err), "moerl: error: --port: Value 99999 not in range 0 to 65535") << r.err;
}

TEST(Cli, UnknownFlagPrintsUsageAndExitsTwo) {
  const auto r = run_command(kMoerl + " eval x --data y --no-such-flag");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE((r.out + r.err).find("Usage"), std::string::npos);
}

TEST(Cli, NoSubcommandIsBadUsage) {
  EXPECT_EQ(run_command(kMoerl).exit_code, 2);
}

TEST(Cli, RunRefusesAnOutPathThatIsAFile) {
  const std::filesystem::path file = std::filesystem::temp_directory_path() / "moerl-cli-out-is-a-file";
  const std::filesystem::path recipe = std::filesystem::temp_directory_path() / "moerl-cli-out-recipe.yaml";
  std::ofstream(file) << "not a folder\n";
  std::ofstream(recipe) << "name: t\nstages:\n  - name: a\n    kind: pretrain\n    steps: 1\n";
  const auto r = run_command(kMoerl + " run " + recipe.string() + " --out " + file.string());
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_EQ(r.err, "moerl: error: --out " + file.string() +
                       ": exists and is not a folder (the run folder holds checkpoints, metrics and the summary)\n");
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

TEST(Cli, RunExecutesARecipeAndWritesTheRunFolder) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / "moerl-cli-run";
  fs::remove_all(dir);
  fs::create_directories(dir);
  {
    std::ofstream corpus(dir / "corpus.jsonl");
    for (int d = 0; d < 30; ++d) {
      std::string text;
      for (int s = 0; s < 20; ++s) text += "the quick brown fox " + std::to_string(d * s % 7) + " jumps over the lazy dog. ";
      corpus << nlohmann::json{{"text", text}}.dump() << "\n";
    }
    std::ofstream(dir / "recipe.yaml") << "name: tiny\nthreads: 1\ndata:\n  corpus: " << (dir / "corpus.jsonl").string()
                                       << "\n  vocab_size: 320\n  validation_every: 5\n"
                                          "model:\n  hidden_size: 32\n  num_hidden_layers: 2\n  kv_lora_rank: 16\n"
                                          "stages:\n  - name: pretrain\n    kind: pretrain\n    steps: 30\n"
                                          "    batch: 2\n    seq: 16\n    eval_every: 2\n    eval_batches: 1\n";
  }
  const auto r = run_command(kMoerl + " run " + (dir / "recipe.yaml").string() + " --set stages.0.steps=4 --out " +
                             (dir / "out").string());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto summary = nlohmann::json::parse(r.out);
  EXPECT_EQ(summary["stages"][0]["steps"].get<int64_t>(), 4);  // the --set override took effect
  for (const char* f : {"summary.json", "metrics.jsonl", "tokenizer.model", "report.html", "report.txt",
                        "pretrain/model.safetensors", "pretrain/config.json", "pretrain/optimizer.safetensors",
                        "pretrain/trainer_state.json"})
    EXPECT_TRUE(fs::exists(dir / "out" / f)) << f;
  std::ifstream table_file(dir / "out" / "report.txt");
  const std::string table((std::istreambuf_iterator<char>(table_file)), std::istreambuf_iterator<char>());
  EXPECT_NE(table.find("pretrain"), std::string::npos) << table;  // the stage's row
  EXPECT_NE(r.err.find(table), std::string::npos) << "the table is also printed at the end";
  // A bad override is a usage-level failure of the recipe: one line naming the field.
  const auto bad = run_command(kMoerl + " run " + (dir / "recipe.yaml").string() + " --set stages.0.steps=zero");
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_NE(bad.err.find("stages[0].steps: expected an integer"), std::string::npos) << bad.err;
}

}  // namespace
}  // namespace moerl
