// The preferences stage with its pairs from the actors (ActorPairSource): the rollout actor samples two answers
// per prompt, the replay buffer actor keeps them durably under the stage's folder, the feedback collector actor
// queues them; the scripted annotator judges every pair over HTTP and the comparisons land in the store.
#include <omp.h>

#include <map>
#include <random>

#include "actors/roles/preference_pairs.hpp"
#include "runtime/messages/codec.hpp"
#include "runtime/optim/adamw.hpp"
#include "runtime/rl/preferences.hpp"
#include "runtime/rl/task_loop.hpp"
#include "runtime/store/pair_record.hpp"
#include "runtime/train/preferences_stage.hpp"
#include "runtime/train/rl_collect.hpp"
#include "tests/actors/support.hpp"

namespace moerl::actors {
namespace {

using namespace moerl::actors::testing;

struct Fixture {
  Tokenizer tokenizer;
  std::unique_ptr<Model> policy;
};

// A BPE tokenizer that knows digits, '+' and '=', and a tiny random policy over its vocabulary.
Fixture make_fixture() {
  std::mt19937 rng(3);
  std::vector<std::string> texts;
  for (int d = 0; d < 40; ++d) {
    std::string text;
    for (int s = 0; s < 20; ++s) {
      const int a = static_cast<int>(rng() % 10), b = static_cast<int>(rng() % 10);
      text += "we add " + std::to_string(a) + "+" + std::to_string(b) + "=" + std::to_string(a + b) + " today. ";
    }
    texts.push_back(text);
  }
  Fixture f{Tokenizer::train(texts, 300), nullptr};
  ModelConfig c;
  c.vocab_size = f.tokenizer.vocab_size(); c.hidden_size = 32; c.intermediate_size = 64; c.moe_intermediate_size = 16;
  c.num_hidden_layers = 2; c.num_attention_heads = 2; c.q_lora_rank = 0; c.kv_lora_rank = 16;
  c.qk_nope_head_dim = 8; c.qk_rope_head_dim = 8; c.v_head_dim = 8; c.n_routed_experts = 4;
  c.num_experts_per_tok = 2; c.n_group = 1; c.topk_group = 1; c.num_nextn_predict_layers = 0;
  c.max_position_embeddings = 64; c.bos_token_id = Tokenizer::kBosId; c.eos_token_id = Tokenizer::kEosId;
  f.policy = std::make_unique<Model>(c);
  f.policy->init_random(11);
  // A short SFT on the task, so responses are digits (a random policy's byte pieces need not be valid UTF-8,
  // which the endpoint's JSON refuses) and some are right (pairs with a preference as well as ties).
  const rl::AdditionTask task{1};
  const rl::TaskCodec codec = tokenizer_codec(f.tokenizer);
  const auto problems = rl::training_problems(task, 5, 60 * 16);
  AdamWConfig oc;
  oc.lr = 1e-2;
  oc.weight_decay = 0;
  oc.total_steps = 60;
  AdamW opt(f.policy->params(), oc);
  for (int64_t step = 0; step < 60; ++step)
    rl::sft_step(*f.policy, opt, std::span(problems).subspan(static_cast<size_t>(step) * 16, 16), step,
                 Precision::FP32, codec);
  return f;
}

Recipe recipe_in(const fs::path& out) {
  Recipe r;
  r.seed = 7;
  r.threads = 1;  // the rollout actor's thread too
  r.out = out;
  return r;
}

StageSpec prefs_stage() {
  StageSpec s;
  s.name = "prefs";
  s.kind = "preferences";
  s.rl.task_digits = 1;
  s.rl.pairs = 24;
  s.rl.heldout_every = 4;
  s.rl.max_new_tokens = 3;
  return s;
}

// The pairs queued in a preferences stage's store, by pair id (prompt index + 1): prompt, first and second texts.
std::map<uint64_t, std::array<std::string, 3>> queued_pairs(const fs::path& db) {
  std::map<uint64_t, std::array<std::string, 3>> out;
  store::DurableStore s(db.string());
  s.scan(store::Family::Pair, 0, UINT64_MAX, [&](const store::Key&, std::span<const uint8_t> b) {
    const auto p = store::decode_pair(b);
    EXPECT_TRUE(out.emplace(p.pair_id, std::array<std::string, 3>{p.prompt.text, p.first.text, p.second.text}).second);
    return true;
  });
  return out;
}

struct OneThread {  // a tiny model: OpenMP fork/join costs more than it saves (restored afterwards)
  int threads = omp_get_max_threads();
  OneThread() { omp_set_num_threads(1); }
  ~OneThread() { omp_set_num_threads(threads); }
};

TEST(PreferencePairs, ThroughTheRolloutReplayAndCollectorActorsAreJudgedOverHttpAndStored) {
  OneThread one;
  const auto dir = fresh_dir("preference-pairs");
  RemoveAtExit cleanup{dir};
  auto fx = make_fixture();
  const StageSpec stage = prefs_stage();
  MetricsLog metrics;

  const Recipe through_actors = recipe_in(dir / "actors");
  fs::create_directories(through_actors.out / stage.name);
  ActorPairSource source;
  const auto summary =
      run_preferences(through_actors, stage, *fx.policy, fx.tokenizer, metrics, through_actors.out / stage.name, &source);
  EXPECT_EQ(summary["pair_source"], "actors");
  // The judgements taken over HTTP went through a feedback collector actor, not straight into the store.
  EXPECT_EQ(summary["judgements_through"], "actor feedback/prefs/judgements");
  // Every prompt's pair is queued unless its two responses are identical (a certain tie, not shown to anyone).
  const int64_t queued = summary["pairs_queued"].get<int64_t>();
  EXPECT_EQ(queued + summary["identical_pairs_skipped"].get<int64_t>(), 24);
  EXPECT_GT(queued, 0);
  EXPECT_EQ(summary["pairs_judged"].get<int64_t>(), queued);
  EXPECT_EQ(summary["comparisons_stored"].get<int64_t>(), queued);
  const int64_t preferences = summary["preference_pairs"].get<int64_t>() + summary["heldout_preference_pairs"].get<int64_t>();
  EXPECT_EQ(preferences, queued - summary["ties"].get<int64_t>());

  // The replay buffer's store: two rollouts per prompt, log-probs and policy version kept.
  const fs::path stage_dir = through_actors.out / stage.name;
  std::map<uint64_t, std::vector<std::vector<int32_t>>> responses;  // request id -> samples' ids
  {
    store::DurableStore replay((stage_dir / "replay").string());
    EXPECT_EQ(replay.count(store::Family::Replay), 48u);
    replay.scan_by_version(0, 1, [&](const store::Key&, std::span<const uint8_t> b) {
      const auto r = msg::decode_replay_record(b);
      EXPECT_EQ(r.rollout.log_probs.size(), r.rollout.response_ids.size());
      auto& samples = responses[r.rollout.request_id];
      samples.resize(2);
      samples[r.rollout.sample_index] = r.rollout.response_ids;
      return true;
    });
  }
  ASSERT_EQ(responses.size(), 24u);
  // Each queued pair is its request's two rollouts, in sample order; a request whose two rollouts are the same
  // ids is not queued; each queued pair was judged into a comparison.
  const auto pairs = queued_pairs(stage_dir / "feedback");
  EXPECT_EQ(static_cast<int64_t>(pairs.size()), queued);
  for (const auto& [request, samples] : responses) {
    const auto it = pairs.find(request);
    if (samples[0] == samples[1]) {
      EXPECT_EQ(it, pairs.end()) << request;
      continue;
    }
    ASSERT_NE(it, pairs.end()) << request;
    EXPECT_EQ(it->second[1], judged_text(fx.tokenizer, samples[0])) << request;
    EXPECT_EQ(it->second[2], judged_text(fx.tokenizer, samples[1])) << request;
  }
  {
    store::DurableStore s((stage_dir / "feedback").string());
    EXPECT_EQ(static_cast<int64_t>(s.count(store::Family::Comparison)), queued);
  }

  // The same recipe again samples the same pairs (the rollouts are seeded per request).
  const Recipe again = recipe_in(dir / "again");
  fs::create_directories(again.out / stage.name);
  const auto summary2 = run_preferences(again, stage, *fx.policy, fx.tokenizer, metrics, again.out / stage.name, &source);
  EXPECT_EQ(queued_pairs(again.out / stage.name / "feedback"), pairs);
  EXPECT_EQ(summary2["ties"], summary["ties"]);

  // Two rollout actors (threads: 2), the second on a copy of the policy: the same pairs.
  Recipe two_lanes = recipe_in(dir / "two-lanes");
  two_lanes.threads = 2;
  fs::create_directories(two_lanes.out / stage.name);
  run_preferences(two_lanes, stage, *fx.policy, fx.tokenizer, metrics, two_lanes.out / stage.name, &source);
  EXPECT_EQ(queued_pairs(two_lanes.out / stage.name / "feedback"), pairs);
  EXPECT_FALSE(fs::exists(two_lanes.out / stage.name / "policy-copy"));

  // A rollout actor killed mid-stage is respawned and asked again: the same pairs.
  caf::actor_system system{test_config()};
  RlhfActorOptions options;
  options.before_request = [](const std::string& name, const caf::actor& actor, uint64_t sent) {
    if (name == kRlhfRolloutName && sent == 7) caf::anon_send_exit(actor, caf::exit_reason::kill);
  };
  ActorPairSource supervised(system, options);
  const Recipe killed = recipe_in(dir / "killed");
  fs::create_directories(killed.out / stage.name);
  ::testing::internal::CaptureStderr();
  run_preferences(killed, stage, *fx.policy, fx.tokenizer, metrics, killed.out / stage.name, &supervised);
  const std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(log.find("rollout/0 died"), std::string::npos) << log;
  EXPECT_EQ(queued_pairs(killed.out / stage.name / "feedback"), pairs);

  // Without the actors: the same kind of result (the in-process sampling draws other responses).
  const Recipe in_process = recipe_in(dir / "in-process");
  fs::create_directories(in_process.out / stage.name);
  const auto plain = run_preferences(in_process, stage, *fx.policy, fx.tokenizer, metrics, in_process.out / stage.name, nullptr);
  EXPECT_EQ(plain["pair_source"], "in-process");
  EXPECT_EQ(plain["judgements_through"], "store");
  EXPECT_EQ(plain["pairs_judged"].get<int64_t>() + plain["identical_pairs_skipped"].get<int64_t>(), 24);
  std::printf("preferences on 24 prompts: through the actors %lld ties, in-process %lld ties\n",
              static_cast<long long>(summary["ties"].get<int64_t>()), static_cast<long long>(plain["ties"].get<int64_t>()));
}

}  // namespace
}  // namespace moerl::actors
