// Training end to end on a small synthetic corpus: the loss falls, SFT takes loss on responses only, and a
// resumed run repeats the uninterrupted one bit for bit.
#include "runtime/train/trainer.hpp"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "runtime/train/checkpoint.hpp"
#include "runtime/train/run_recipe.hpp"
#include "tests/support/grammar_corpus.hpp"

namespace moerl {
namespace {

namespace fs = std::filesystem;

fs::path fresh_dir(const std::string& name) {
  const fs::path d = fs::temp_directory_path() / ("moerl-train-test-" + name);
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

// tests/support/grammar_corpus.hpp's corpus in dir.
fs::path write_corpus(const fs::path& dir) { return moerl::test::write_grammar_corpus(dir / "corpus.jsonl"); }

Recipe small_recipe(const fs::path& dir) {
  Recipe r;
  r.file = dir / "recipe.yaml";
  r.name = "small";
  r.seed = 5;
  r.threads = 2;
  r.out = dir / "run";
  r.data.corpus = write_corpus(dir).string();
  r.data.vocab_size = 300;
  r.data.validation_every = 10;
  ModelConfig& c = r.model;
  c.hidden_size = 32; c.intermediate_size = 64; c.moe_intermediate_size = 16; c.num_hidden_layers = 2;
  c.num_attention_heads = 2; c.q_lora_rank = 0; c.kv_lora_rank = 16; c.qk_nope_head_dim = 8; c.qk_rope_head_dim = 8;
  c.v_head_dim = 8; c.n_routed_experts = 4; c.num_experts_per_tok = 2; c.n_group = 1; c.topk_group = 1;
  c.num_nextn_predict_layers = 1;
  StageSpec s;
  s.name = "pretrain";
  s.kind = "pretrain";
  s.steps = 40;
  s.batch = 4;
  s.seq = 32;
  s.mtp_weight = 0.3f;
  s.balance_alpha = 1e-3f;
  s.eval_every = 20;
  s.eval_batches = 4;
  s.checkpoint_every = 20;
  s.optimizer.lr = 1e-2;
  s.optimizer.warmup_steps = 4;
  s.optimizer.total_steps = s.steps;
  r.stages.push_back(s);
  return r;
}

std::vector<double> losses(const fs::path& metrics) {
  std::vector<double> out;
  std::ifstream f(metrics);
  std::string line;
  while (std::getline(f, line)) {
    const auto j = nlohmann::json::parse(line);
    if (j.contains("loss") && j.contains("step")) out.push_back(j["loss"].get<double>());
  }
  return out;
}

TEST(Training, PretrainingLowersValidationLossBelowTheBigramBaseline) {
  const fs::path dir = fresh_dir("pretrain");
  const auto summary = run_recipe(small_recipe(dir));
  const auto& s = summary["stages"][0];
  const auto curve = losses(dir / "run" / "metrics.jsonl");
  ASSERT_EQ(curve.size(), 40u);
  EXPECT_LT(curve.back(), 0.6 * curve.front());  // from ~ln(300) = 5.7 to well below
  EXPECT_LT(s["validation_loss"].get<double>(), s["bigram_validation_loss"].get<double>());
  EXPECT_TRUE(fs::exists(dir / "run" / "pretrain" / "model.safetensors"));
  EXPECT_TRUE(fs::exists(dir / "run" / "summary.json"));
}

TEST(Training, ResumedRunRepeatsTheUninterruptedLossesBitForBit) {
  const fs::path a = fresh_dir("resume-a"), b = fresh_dir("resume-b");
  run_recipe(small_recipe(a));
  // The interrupted run: the same recipe stopped after step 20 (its schedule still spans 40 steps), then the
  // full recipe run again on the same folder, which resumes from the step-20 checkpoint.
  Recipe first = small_recipe(b);
  first.stages[0].steps = 20;
  run_recipe(first);
  run_recipe(small_recipe(b));
  const auto la = losses(a / "run" / "metrics.jsonl"), lb = losses(b / "run" / "metrics.jsonl");
  ASSERT_EQ(la.size(), 40u);
  ASSERT_EQ(lb.size(), 40u);
  for (size_t i = 0; i < la.size(); ++i) EXPECT_EQ(la[i], lb[i]) << "step " << i + 1;
}

TEST(Training, SftTakesLossOnResponsesOnly) {
  const fs::path dir = fresh_dir("sft");
  Recipe r = small_recipe(dir);
  r.stages[0].steps = 10;
  r.stages[0].optimizer.total_steps = 10;
  StageSpec sft = r.stages[0];
  sft.steps = 40;
  sft.optimizer.total_steps = 40;
  {
    std::ofstream f(dir / "sft.jsonl");
    for (int i = 0; i < 40; ++i)
      f << nlohmann::json{{"prompt", "the cat sees"}, {"response", i % 2 ? " the red ball." : " a letter."}}.dump() << "\n";
  }
  sft.name = "sft";
  sft.kind = "sft";
  sft.data = dir / "sft.jsonl";
  sft.mtp_weight = 0;
  r.stages.push_back(sft);
  const auto summary = run_recipe(r);
  // Two equally likely responses after the same prompt: the best achievable mean loss is about
  // ln(2) / (response tokens + eos); the model must get close to it, far below the pretraining loss.
  const double sft_loss = summary["stages"][1]["validation_loss"].get<double>();
  EXPECT_LT(sft_loss, 0.5);
  EXPECT_GT(sft_loss, 0.05);  // the coin flip between the two responses cannot be learned away
}

}  // namespace
}  // namespace moerl
