// The quickstart's flow, small, through the `moerl` executable: pretrain -> task_sft (the policy) -> task_sft
// continued (the reward model's backbone) -> eval of the policy -> preferences (pairs sampled from the policy,
// judged by the scripted annotator over the feedback endpoint's HTTP API, stored in RocksDB) -> reward_model
// (on the longer-trained backbone, trained on the comparisons read back from the store) -> rlhf (GRPO from the
// policy, rewarded by the reward model) -> eval, in one `moerl run RECIPE --out DIR`. Checks that every stage ran and summary.json's
// fields; accuracies are bounded, not thresholded (a model this small and short is not the quickstart's claim).
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>

#include <nlohmann/json.hpp>

#include "runtime/messages/codec.hpp"
#include "runtime/rl/preferences.hpp"
#include "runtime/store/durable_store.hpp"
#include "tests/rl/flow_support.hpp"

namespace moerl {
namespace {

namespace fs = std::filesystem;

std::string read_all(const fs::path& p) {
  std::ifstream in(p);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

const char* const kRecipe = R"(name: quickstart-mini
seed: 7
threads: 1            # a tiny model: OpenMP fork/join would cost more than it saves
data:
  corpus: CORPUS
  vocab_size: 300
  validation_every: 10
model:
  hidden_size: 32
  num_hidden_layers: 2
  first_k_dense_replace: 1
  intermediate_size: 64
  num_attention_heads: 2
  q_lora_rank: 0
  kv_lora_rank: 16
  qk_nope_head_dim: 8
  qk_rope_head_dim: 8
  v_head_dim: 8
  n_routed_experts: 4
  n_shared_experts: 1
  num_experts_per_tok: 2
  moe_intermediate_size: 16
  n_group: 1
  topk_group: 1
  num_nextn_predict_layers: 0
  max_position_embeddings: 64
stages:
  - {name: pretrain, kind: pretrain, steps: 10, batch: 4, seq: 32, eval_every: 10, eval_batches: 2,
     optimizer: {lr: 1.0e-2}}
  - {name: sft, kind: task_sft, task_digits: 1, steps: 200, batch: 16, eval_every: 100,
     optimizer: {lr: 1.0e-2, weight_decay: 0.0}}
  - {name: sft_rm, kind: task_sft, from: sft, task_digits: 1, steps: 20, batch: 16,
     optimizer: {lr: 1.0e-2, weight_decay: 0.0}}
  - {name: eval_sft, kind: eval_task, from: sft, task_digits: 1, problems: 10, max_new_tokens: 4}
  - {name: prefs, kind: preferences, from: sft, task_digits: 1, pairs: 200, heldout_every: 4, max_new_tokens: 4}
  - {name: rm, kind: reward_model, from: sft_rm, task_digits: 1, steps: 40, batch: 16, eval_every: 20,
     optimizer: {lr: 3.0e-3, weight_decay: 0.0}}
  - {name: rlhf, kind: rlhf, from: sft, algorithm: grpo, task_digits: 1, steps: 4, batch: 4, group_size: 4,
     max_new_tokens: 4, optimizer: {lr: 1.0e-3}}
  - {name: eval_rlhf, kind: eval_task, task_digits: 1, problems: 10, max_new_tokens: 4}
)";

TEST(QuickstartFlow, MoerlRunGoesFromPretrainingThroughHttpJudgedPreferencesToRlhf) {
  const fs::path dir = fs::temp_directory_path() / "moerl-quickstart-flow-test";
  fs::remove_all(dir);
  fs::create_directories(dir);
  test::write_sums_corpus(dir);
  std::string recipe = kRecipe;
  recipe.replace(recipe.find("CORPUS"), 6, (dir / "corpus.jsonl").string());
  std::ofstream(dir / "recipe.yaml") << recipe;
  const fs::path out = dir / "run";
  const std::string cmd = std::string(MOERL_BINARY) + " run " + (dir / "recipe.yaml").string() + " --out " +
                          out.string() + " > " + (dir / "stdout").string() + " 2> " + (dir / "stderr").string();
  ASSERT_EQ(std::system(cmd.c_str()), 0) << read_all(dir / "stderr");

  const auto summary = nlohmann::json::parse(read_all(out / "summary.json"));
  ASSERT_EQ(summary["stages"].size(), 8u) << summary.dump(2);
  const char* const kinds[] = {"pretrain", "task_sft", "task_sft", "eval_task", "preferences", "reward_model",
                               "rlhf", "eval_task"};
  for (size_t i = 0; i < 8; ++i) EXPECT_EQ(summary["stages"][i]["kind"], kinds[i]) << i;
  // task_accuracy_sft is the policy's (eval_sft, from sft), not the reward model backbone's.
  EXPECT_EQ(summary["task_accuracy_sft"], summary["stages"][3]["task_accuracy"]);
  for (const char* key : {"rm_heldout_accuracy", "task_accuracy_sft", "task_accuracy_rlhf", "kl_to_reference"}) {
    ASSERT_TRUE(summary.contains(key)) << key << "\n" << summary.dump(2);
    EXPECT_GE(summary[key].get<double>(), 0.0) << key;  // accuracies and the k3 KL estimate are >= 0
  }
  for (const char* key : {"rm_heldout_accuracy", "task_accuracy_sft", "task_accuracy_rlhf"})
    EXPECT_LE(summary[key].get<double>(), 1.0) << key;
  EXPECT_GT(summary["wall_s"].get<double>(), 0.0);

  // Preferences: every pair of two different responses was queued, judged over HTTP and stored; the reward
  // model trained on those.
  const auto& prefs = summary["stages"][4];
  EXPECT_EQ(prefs["pairs_queued"].get<int64_t>() + prefs["identical_pairs_skipped"].get<int64_t>(), 200);
  EXPECT_EQ(prefs["pairs_judged"], prefs["pairs_queued"]);
  EXPECT_EQ(prefs["comparisons_stored"], prefs["pairs_queued"]);
  EXPECT_EQ(prefs["rate_limited"].get<int64_t>(), 0);
  EXPECT_NE(prefs["url"].get<std::string>().find("http://127.0.0.1:"), std::string::npos);
  EXPECT_TRUE(fs::exists(out / "prefs" / "feedback"));
  // The pairs with a preference are the non-ties; each names the checker's right answer as chosen.
  const auto train = read_preferences(out / "preferences" / "prefs.jsonl");
  const auto held = read_preferences(out / "preferences" / "prefs-heldout.jsonl");
  EXPECT_EQ(static_cast<int64_t>(train.size() + held.size()),
            prefs["pairs_judged"].get<int64_t>() - prefs["ties"].get<int64_t>());
  for (const auto& p : train) {
    const int a = p.prompt[0] - '0', b = p.prompt[2] - '0';
    EXPECT_EQ(p.chosen, std::to_string(a + b)) << p.prompt;
  }
  const auto& rm = summary["stages"][5];
  EXPECT_NE(rm["preferences"].get<std::string>().find("feedback endpoint"), std::string::npos);
  EXPECT_EQ(rm["rm_heldout_pairs"].get<size_t>(), held.size());
  // RLHF: rewarded by the reward model, the checker only monitoring.
  const auto& rl = summary["stages"][6];
  EXPECT_EQ(rl["algorithm"], "grpo");
  EXPECT_EQ(rl["reward_source"], "reward model rm");
  EXPECT_TRUE(fs::exists(out / "rlhf" / "model.safetensors"));
  // Every rollout of every step went to the durable replay buffer: 4 steps x 4 prompts x 4 samples, each with
  // its reward and the policy version (= step) that generated it.
  {
    store::DurableStore replay((out / "replay" / "rlhf").string());
    EXPECT_EQ(replay.count(store::Family::Replay), 64u);
    for (uint64_t version = 0; version < 4; ++version) {
      int64_t n = 0;
      replay.scan_by_version(version, version + 1, [&](const store::Key&, std::span<const uint8_t> b) {
        const auto r = msg::decode_replay_record(b);
        EXPECT_EQ(r.rollout.policy_version.version, version);
        EXPECT_EQ(r.rollout.log_probs.size(), r.rollout.response_ids.size());
        ++n;
        return true;
      });
      EXPECT_EQ(n, 16) << "policy version " << version;
    }
  }
  // The final table on stderr and in report.txt; the HTML report has the stages.
  const std::string table = read_all(out / "report.txt");
  for (const char* name : {"pretrain", "sft", "prefs", "rm", "rlhf", "eval_rlhf", "task_accuracy_rlhf"})
    EXPECT_NE(table.find(name), std::string::npos) << name;
  EXPECT_NE(read_all(dir / "stderr").find("task_accuracy_sft"), std::string::npos);
  EXPECT_NE(read_all(out / "report.html").find("<h2>rlhf</h2>"), std::string::npos);
}

}  // namespace
}  // namespace moerl
