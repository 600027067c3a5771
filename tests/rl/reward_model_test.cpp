// The reward model: Bradley–Terry gradients against finite differences, training on machine-judged pairs of
// an addition task to held-out pairwise accuracy, save/load, and the preference JSONL format.
#include "runtime/rl/reward_model.hpp"

#include <gtest/gtest.h>
#include <omp.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "runtime/error.hpp"
#include "runtime/rl/preferences.hpp"
#include "runtime/safetensors.hpp"
#include "tests/support/gradcheck.hpp"

namespace moerl {
namespace {

// Byte-level ids laid out as the Tokenizer's byte fallback: 4 + byte.
std::vector<int32_t> byte_ids(std::string_view text) {
  std::vector<int32_t> ids;
  for (unsigned char ch : text) ids.push_back(4 + static_cast<int32_t>(ch));
  return ids;
}

ModelConfig tiny_config(bool moe) {
  ModelConfig c;
  c.vocab_size = 260;
  c.hidden_size = 48;
  c.intermediate_size = 96;
  c.moe_intermediate_size = 32;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.kv_lora_rank = 16;
  c.qk_nope_head_dim = 8;
  c.qk_rope_head_dim = 8;
  c.v_head_dim = 8;
  c.first_k_dense_replace = moe ? 1 : 2;
  c.n_routed_experts = moe ? 4 : 0;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 2;
  c.max_position_embeddings = 64;
  c.initializer_range = 0.05;
  return c;
}

// Machine-judged pairs of single-digit addition "a+b=": the correct sum against every answer one digit away
// from it (corrupt_digits' neighbourhood), the preference decided by an exact checker. All distinct pairs.
std::vector<PreferencePair> addition_pairs() {
  std::vector<Candidates> candidates;
  for (int a = 0; a < 10; ++a)
    for (int b = 0; b < 10; ++b) {
      const std::string prompt = std::to_string(a) + "+" + std::to_string(b) + "=";
      const std::string right = std::to_string(a + b);
      for (size_t at = 0; at < right.size(); ++at)
        for (char d = '0'; d <= '9'; ++d) {
          std::string wrong = right;
          wrong[at] = d;
          if (wrong == right || (wrong.size() > 1 && wrong[0] == '0')) continue;
          candidates.push_back((a + b + d) % 2 ? Candidates{prompt, right, wrong} : Candidates{prompt, wrong, right});
        }
    }
  const AnswerChecker exact = [](const std::string& prompt, const std::string& response) {
    const int a = prompt[0] - '0', b = prompt[2] - '0';
    return response == std::to_string(a + b);
  };
  return judge_by_checker(candidates, exact);
}

std::vector<TokenPair> tokenize(const std::vector<PreferencePair>& pairs) {
  std::vector<TokenPair> out;
  for (const auto& p : pairs) {
    ScoredTokens chosen = preference_tokens(byte_ids, p.prompt, p.chosen, 0, 1);
    out.push_back({std::move(chosen.ids), preference_tokens(byte_ids, p.prompt, p.rejected, 0, 1).ids,
                   chosen.response_start});
  }
  return out;
}

TEST(RewardModel, BradleyTerryGradientsMatchFiniteDifferences) {
  RewardModel rm(tiny_config(false));  // dense: no routing decision flips under a perturbation
  rm.init_random(7);
  // Pairs of different lengths, so padding and the gather of the response positions (from 5 on) are exercised.
  const std::vector<TokenPair> pairs{{byte_ids("\x01" "3+4=7"), byte_ids("\x01" "3+4=18"), 5},
                                     {byte_ids("\x01" "9+9=18"), byte_ids("\x01" "9+9=8"), 5}};
  for (auto& [name, p] : rm.params().all())  // a larger head so the loss is not flat near margin 0
    if (name == "score.weight")
      for (int64_t i = 0; i < p.value.numel(); ++i) p.value.data<float>()[i] *= 20.0f;
  rm.params().zero_grad();
  rm.forward_backward(pairs, Precision::FP32);
  for (const char* name : {"score.weight", "model.norm.weight", "model.embed_tokens.weight",
                           "model.layers.1.self_attn.o_proj.weight"}) {
    Param& p = rm.params().at(name);
    std::vector<float> analytic(p.grad.data<float>(), p.grad.data<float>() + p.grad.numel());
    auto loss = [&] { return rm.evaluate(pairs, Precision::FP32).loss; };
    // h = 1e-2 on weights of size ~0.05-1: the FP32 forward's relative noise ~1e-6 over 2h gives ~1e-5 of the
    // loss, well inside atol; truncation h²/6·∂³L stays below rtol for this smooth (dense) network.
    const auto r = test::gradcheck(loss, p.value.data<float>(), p.value.numel(), analytic.data(),
                                   {.step = 1e-2, .atol = 2e-5, .rtol = 2e-2, .max_checks = 24});
    EXPECT_EQ(r.failures, 0) << r.describe(name);
  }
}

TEST(RewardModel, LearnsMachineJudgedAdditionPairsToHeldOutAccuracyAbove85Percent) {
  auto pairs = addition_pairs();
  std::mt19937_64 rng(5);
  std::shuffle(pairs.begin(), pairs.end(), rng);
  const size_t n_held = pairs.size() / 5;
  const std::vector<PreferencePair> held(pairs.begin(), pairs.begin() + static_cast<long>(n_held));
  const std::vector<PreferencePair> train(pairs.begin() + static_cast<long>(n_held), pairs.end());
  // Held out: 20% of the distinct pairs. Their prompts occur in training with other wrong answers, so the
  // model must score a wrong answer it never saw for that prompt below the right one.
  const auto train_t = tokenize(train), held_t = tokenize(held);

  RewardModel rm(tiny_config(true));
  rm.init_random(3);
  const PairMetrics before = rm.evaluate(held_t, Precision::FP32);
  RewardTrainConfig cfg;
  cfg.steps = 500;  // measured held-out accuracy: 0.97 at 500 steps with this schedule (~6 s of CPU time)
  cfg.batch = 32;
  cfg.optimizer.lr = 3e-3;  // 1e-2 stalls at ~0.75
  cfg.optimizer.weight_decay = 0.0;
  // One thread: the model is tiny (64 sequences of <= 8 tokens a step), so OpenMP's fork/join costs more than it
  // saves, and on a busy machine its spinning threads slow the test tenfold. The result does not depend on it.
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  cfg.optimizer.warmup_steps = 20;
  const RewardTrainResult r = train_reward_model(rm, train_t, held_t, cfg);
  std::cout << "held-out pairs " << held_t.size() << " before " << before.accuracy << " after "
            << r.heldout.accuracy << " (loss " << r.heldout.loss << "), train " << r.train.accuracy << ", "
            << r.wall_s << " s\n";
  omp_set_num_threads(threads);
  EXPECT_GE(r.heldout.accuracy, 0.85);  // the bar
  EXPECT_LT(r.heldout.loss, before.loss);
}

TEST(RewardModel, ScoresTheSumOverTheResponsePositions) {
  // r(start) = Σ_{t >= start} w · norm(h_t): dropping the first response position removes exactly that position's
  // term, which is the score of the sequence cut after it (causal attention: h_t does not see later tokens).
  RewardModel rm(tiny_config(true));
  rm.init_random(4);
  const std::vector<int32_t> seq = byte_ids("\x01" "9+9=18");  // 7 tokens: bos, 9, +, 9, =, 1, 8
  const std::vector<int32_t> cut(seq.begin(), seq.begin() + 6);
  const float from5 = rm.score({seq}, {5}, Precision::FP32).front();
  const float from6 = rm.score({seq}, {6}, Precision::FP32).front();
  const float at5 = rm.score({cut}, {5}, Precision::FP32).front();
  // Terms of ~0.1-1 summed in double and rounded once to FP32; the two forwards differ only in sequence length
  // (GEMM blocking may round h_t differently in the last bits): 1e-5 absolute is ~100 FP32 ulps of the terms.
  EXPECT_NEAR(from5, from6 + at5, 1e-5);
  EXPECT_NE(from6, from5);  // position 5 counts
  EXPECT_THROW(rm.score({seq}, {7}, Precision::FP32), Error);  // no response token left to score
}

TEST(RewardModel, ScoresARolloutAsATrainingSequenceEndingInEos) {
  // Training sequences end in eos: a rollout's response gets one appended unless it already ends in it, and the
  // score starts at the response (both the in-process rlhf stage and the reward-model actor score this way).
  RewardModel rm(tiny_config(true));
  rm.init_random(5);
  const auto eos = static_cast<int32_t>(rm.config().eos_token_id);
  const std::vector<int32_t> prompt = byte_ids("\x01" "9+9="), response = byte_ids("18");
  std::vector<int32_t> whole = prompt;
  whole.insert(whole.end(), response.begin(), response.end());
  whole.push_back(eos);
  const float expected = rm.score({whole}, {static_cast<int64_t>(prompt.size())}, Precision::FP32).front();
  std::vector<int32_t> with_eos = response;
  with_eos.push_back(eos);
  EXPECT_EQ(rm.score_rollout(prompt, response, Precision::FP32), expected);  // same sequence, same forward
  EXPECT_EQ(rm.score_rollout(prompt, with_eos, Precision::FP32), expected);
  std::vector<int32_t> prompt_with_eos = prompt;
  prompt_with_eos.push_back(eos);
  EXPECT_THROW(rm.score_rollout(prompt_with_eos, {}, Precision::FP32), Error);  // nothing of a response to score
}

TEST(RewardModel, SavedModelScoresTheSameAfterLoading) {
  RewardModel rm(tiny_config(true));
  rm.init_random(9);
  const std::vector<std::vector<int32_t>> seqs{byte_ids("\x01" "1+2=3"), byte_ids("\x01" "5+5=10")};
  const auto before = rm.score(seqs, {5, 5}, Precision::FP32);
  const auto dir = std::filesystem::temp_directory_path() / "moerl_rm_save_test";
  std::filesystem::remove_all(dir);
  rm.save(dir);
  const auto loaded = RewardModel::load(dir);
  const auto after = loaded->score(seqs, {5, 5}, Precision::FP32);
  ASSERT_EQ(after.size(), before.size());
  for (size_t i = 0; i < before.size(); ++i) EXPECT_EQ(after[i], before[i]);  // FP32 weights, same arithmetic
  std::filesystem::remove_all(dir);
}

TEST(RewardModel, LoadsAPolicyCheckpointWithoutAScoreHeadAndRefusesAMissingBackboneTensor) {
  RewardModel rm(tiny_config(true));
  rm.init_random(1);
  SafeTensors st;
  st.source = "policy.safetensors";
  for (const auto& [name, p] : rm.params().all())
    if (name != "score.weight") st.tensors.emplace(name, p.value.clone());
  st.tensors.emplace("lm_head.weight", Tensor({260, 48}));  // a policy's head: ignored
  RewardModel other(tiny_config(true));
  other.init_random(2);
  EXPECT_NO_THROW(other.load_weights(st));
  st.tensors.erase("model.embed_tokens.weight");
  try {
    other.load_weights(st);
    FAIL() << "a missing backbone tensor was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.embed_tokens.weight"), std::string::npos) << e.what();
  }
}

TEST(Preferences, RoundTripTheChosenRejectedJsonLines) {
  const auto file = std::filesystem::temp_directory_path() / "moerl_prefs_test" / "pairs.jsonl";
  const std::vector<PreferencePair> pairs{{"12+34=", "46", "47"}, {"say \"hi\"\n", "hi", "bye"}};
  write_preferences(file, pairs);
  const auto back = read_preferences(file);
  ASSERT_EQ(back.size(), 2u);
  EXPECT_EQ(back[1].prompt, "say \"hi\"\n");
  EXPECT_EQ(back[0].chosen, "46");
  EXPECT_EQ(back[0].rejected, "47");
  std::filesystem::remove_all(file.parent_path());
}

TEST(Preferences, AMalformedLineIsAnErrorNamingFileLineAndField) {
  const auto file = std::filesystem::temp_directory_path() / "moerl_prefs_bad.jsonl";
  std::ofstream(file) << "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n\n{\"prompt\": \"a\", \"chosen\": 3}\n";
  try {
    read_preferences(file);
    FAIL() << "a malformed line was accepted";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("moerl_prefs_bad.jsonl:3"), std::string::npos) << msg;
    EXPECT_NE(msg.find("chosen"), std::string::npos) << msg;
  }
  std::filesystem::remove(file);
}

TEST(Preferences, TheCheckerPicksTheCorrectResponseAndDropsTies) {
  const AnswerChecker is_four = [](const std::string&, const std::string& r) { return r == "4"; };
  const auto pairs = judge_by_checker({{"2+2=", "5", "4"}, {"2+2=", "4", "4"}, {"2+2=", "3", "5"}}, is_four);
  ASSERT_EQ(pairs.size(), 1u);
  EXPECT_EQ(pairs[0].chosen, "4");
  EXPECT_EQ(pairs[0].rejected, "5");
  std::mt19937_64 rng(1);
  for (int i = 0; i < 50; ++i) EXPECT_NE(corrupt_digits("46", rng), "46");
}

}  // namespace
}  // namespace moerl
