// The record-keeping and policy roles answer their protocols for real, and refuse malformed messages with an
// error naming the kind instead of crashing.
#include <cmath>
#include <random>

#include "actors/roles/expert_shard.hpp"
#include "actors/roles/feedback_collector.hpp"
#include "actors/roles/reference.hpp"
#include "actors/roles/replay_buffer.hpp"
#include "actors/roles/reward_model.hpp"
#include "actors/roles/rollout.hpp"
#include "runtime/safetensors.hpp"
#include "tests/actors/support.hpp"

namespace moerl::actors {
namespace {

using namespace moerl::actors::testing;

msg::ReplayRecord record(uint64_t request, uint32_t sample) {
  msg::ReplayRecord r;
  r.rollout.request_id = request;
  r.rollout.sample_index = sample;
  r.rollout.prompt_ids = {1, 2, 3};
  r.rollout.response_ids = {4, 5};
  r.rollout.log_probs = {-0.5f, -1.25f};
  r.score = static_cast<float>(request);
  r.advantages = {0.5f, 0.5f};
  r.step = msg::StepId{"rl", 1};
  return r;
}

std::vector<uint64_t> request_ids(const std::vector<Envelope>& records) {
  std::vector<uint64_t> out;
  for (const Envelope& e : records) out.push_back(unwrap<msg::ReplayRecord>(e).rollout.request_id);
  return out;
}

TEST(ReplayBuffer, StoresAndSamplesRecordsAndIgnoresDuplicateDeliveries) {
  caf::actor_system system{test_config()};
  caf::scoped_actor self{system};
  auto buffer = spawn_replay_buffer(system, 4);
  for (uint64_t r = 1; r <= 3; ++r) EXPECT_EQ(ask<uint64_t>(self, buffer, nullptr, put_atom::value, wrap(record(r, 0))), r);
  EXPECT_EQ(ask<uint64_t>(self, buffer, nullptr, put_atom::value, wrap(record(2, 0))), 3u);  // delivered twice
  const auto a = ask<std::vector<Envelope>>(self, buffer, nullptr, sample_atom::value, uint32_t{2}, uint64_t{9});
  const auto b = ask<std::vector<Envelope>>(self, buffer, nullptr, sample_atom::value, uint32_t{2}, uint64_t{9});
  ASSERT_TRUE(a && b);
  const auto ids = request_ids(*a);
  ASSERT_EQ(ids.size(), 2u);
  EXPECT_NE(ids[0], ids[1]);  // without replacement
  EXPECT_EQ(ids, request_ids(*b));
  const auto all = ask<std::vector<Envelope>>(self, buffer, nullptr, sample_atom::value, uint32_t{10}, uint64_t{1});
  ASSERT_TRUE(all);
  auto every = request_ids(*all);
  std::sort(every.begin(), every.end());
  EXPECT_EQ(every, (std::vector<uint64_t>{1, 2, 3}));
  // Past capacity the oldest goes.
  ask<uint64_t>(self, buffer, nullptr, put_atom::value, wrap(record(4, 0)));
  EXPECT_EQ(ask<uint64_t>(self, buffer, nullptr, put_atom::value, wrap(record(5, 0))), 4u);
  const auto last = ask<std::vector<Envelope>>(self, buffer, nullptr, sample_atom::value, uint32_t{10}, uint64_t{1});
  every = request_ids(*last);
  std::sort(every.begin(), every.end());
  EXPECT_EQ(every, (std::vector<uint64_t>{2, 3, 4, 5}));
}

TEST(ReplayBuffer, AnswersMalformedBytesWithAnErrorNamingTheKind) {
  caf::actor_system system{test_config()};
  caf::scoped_actor self{system};
  auto buffer = spawn_replay_buffer(system, 4);
  std::mt19937 rng(3);
  std::vector<uint8_t> garbage(64);
  for (auto& b : garbage) b = static_cast<uint8_t>(rng());
  caf::error err;
  EXPECT_FALSE(ask<uint64_t>(self, buffer, &err, put_atom::value, Envelope{"ReplayRecord", garbage}));
  EXPECT_NE(error_text(err).find("ReplayRecord"), std::string::npos) << describe(err);
  EXPECT_NE(error_text(err).find("replay_buffer/0"), std::string::npos) << describe(err);
  // A truncated valid message, and a message of another kind.
  auto bytes = wrap(record(1, 0)).bytes;
  bytes.resize(bytes.size() - 8);
  EXPECT_FALSE(ask<uint64_t>(self, buffer, &err, put_atom::value, Envelope{"ReplayRecord", bytes}));
  EXPECT_NE(error_text(err).find("ReplayRecord"), std::string::npos) << describe(err);
  EXPECT_FALSE(ask<uint64_t>(self, buffer, &err, put_atom::value, Envelope{"Rollout", bytes}));
  EXPECT_NE(error_text(err).find("expected a ReplayRecord"), std::string::npos) << describe(err);
  EXPECT_EQ(ask<uint64_t>(self, buffer, nullptr, size_atom::value), 0u);  // still alive, nothing stored
}

TEST(FeedbackCollector, KeepsValidRecordsAndRefusesAnUnknownSchemaVersion) {
  caf::actor_system system{test_config()};
  caf::scoped_actor self{system};
  auto collector = spawn_feedback_collector(system);
  msg::Rating rating;
  rating.prompt.text = "Say hi";
  rating.response.text = "hi";
  rating.score = 6;
  rating.annotator = "ann-1";
  rating.timestamp_ns = 1700000000000000000;
  EXPECT_EQ(ask<uint64_t>(self, collector, nullptr, submit_atom::value, wrap(rating)), 1u);
  rating.score = 2;
  EXPECT_EQ(ask<uint64_t>(self, collector, nullptr, submit_atom::value, wrap(rating)), 2u);
  msg::Rating future = rating;
  future.schema_version = msg::kFeedbackSchemaVersion + 1;
  caf::error err;
  EXPECT_FALSE(ask<uint64_t>(self, collector, &err, submit_atom::value, wrap(future)));
  EXPECT_NE(error_text(err).find("Rating.schemaVersion"), std::string::npos) << describe(err);
  const auto listed = ask<std::vector<Envelope>>(self, collector, nullptr, list_atom::value, std::string("Rating"),
                                                 uint64_t{1}, uint64_t{10});
  ASSERT_TRUE(listed);
  ASSERT_EQ(listed->size(), 1u);
  EXPECT_EQ(unwrap<msg::Rating>(listed->front()).score, 2.0f);
}

// The SwiGLU of one expert, by the definition: down(silu(gate x) * up x), in double.
std::vector<double> expert_by_hand(const SafeTensors& st, const std::string& prefix, const float* x, int64_t hidden,
                                   int64_t inter) {
  const float* g = st.at(prefix + "gate_proj.weight").data<float>();
  const float* u = st.at(prefix + "up_proj.weight").data<float>();
  const float* d = st.at(prefix + "down_proj.weight").data<float>();
  std::vector<double> h(static_cast<size_t>(inter)), y(static_cast<size_t>(hidden));
  for (int64_t i = 0; i < inter; ++i) {
    double gi = 0, ui = 0;
    for (int64_t k = 0; k < hidden; ++k) {
      gi += static_cast<double>(g[i * hidden + k]) * x[k];
      ui += static_cast<double>(u[i * hidden + k]) * x[k];
    }
    h[static_cast<size_t>(i)] = gi / (1 + std::exp(-gi)) * ui;
  }
  for (int64_t o = 0; o < hidden; ++o)
    for (int64_t i = 0; i < inter; ++i) y[static_cast<size_t>(o)] += static_cast<double>(d[o * inter + i]) * h[static_cast<size_t>(i)];
  return y;
}

TEST(ExpertShard, RunsEachExpertOnItsRows) {
  const fs::path dir = fresh_dir("expert");
  const RemoveAtExit cleanup{dir};
  const fs::path model_dir = write_model(dir);
  caf::actor_system system{test_config()};
  caf::scoped_actor self{system};
  auto shard = spawn_expert_shard(system, ExpertShardSetup{model_dir, "model.layers.1.mlp", {1, 3}, Precision::FP32});
  EXPECT_EQ(ask<std::vector<int64_t>>(self, shard, nullptr, describe_atom::value), (std::vector<int64_t>{1, 3}));
  constexpr int64_t kHidden = 32, kInter = 16, kRows = 3;
  const std::vector<int64_t> counts{2, 1};  // rows 0-1 to expert 1, row 2 to expert 3
  std::vector<float> x(kRows * kHidden);
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  for (float& v : x) v = normal(rng);
  auto tensor = [](const std::string& name, DType dtype, Shape shape, const void* data, size_t bytes) {
    msg::TensorRef t;
    t.name = name;
    t.dtype = dtype;
    t.shape = std::move(shape);
    t.transport = msg::Transport::Inline;
    t.byte_size = bytes;
    t.inline_data.assign(static_cast<const uint8_t*>(data), static_cast<const uint8_t*>(data) + bytes);
    return t;
  };
  const auto out = ask<Envelope>(self, shard, nullptr, forward_atom::value,
                                 wrap(tensor("counts", DType::I64, {2}, counts.data(), 16)),
                                 wrap(tensor("layer1/rows", DType::F32, {kRows, kHidden}, x.data(), x.size() * 4)));
  ASSERT_TRUE(out);
  const auto y = unwrap<msg::TensorRef>(*out);
  ASSERT_EQ(y.shape, (Shape{kRows, kHidden}));
  const auto* yf = reinterpret_cast<const float*>(y.inline_data.data());
  const SafeTensors st = read_safetensors(model_dir / "model.safetensors");
  for (int64_t r = 0; r < kRows; ++r) {
    const int expert = r < 2 ? 1 : 3;
    const auto want = expert_by_hand(st, "model.layers.1.mlp.experts." + std::to_string(expert) + ".",
                                     x.data() + r * kHidden, kHidden, kInter);
    // FP32 GEMMs against a double reference: sums of 32 and 16 products of O(1e-2) terms, errors ~1e-7.
    for (int64_t o = 0; o < kHidden; ++o) EXPECT_NEAR(yf[r * kHidden + o], want[static_cast<size_t>(o)], 1e-5) << r << "," << o;
  }
  caf::error err;  // rows that do not add up to the counts
  EXPECT_FALSE(ask<Envelope>(self, shard, &err, forward_atom::value,
                             wrap(tensor("counts", DType::I64, {2}, counts.data(), 16)),
                             wrap(tensor("layer1/rows", DType::F32, {2, kHidden}, x.data(), 2 * kHidden * 4))));
  EXPECT_NE(error_text(err).find("expert_shard/0: forward: rows"), std::string::npos) << describe(err);
}

TEST(PolicyRoles, RolloutReferenceAndRewardAgreeOnTheSameWeights) {
  const fs::path dir = fresh_dir("policy");
  const RemoveAtExit cleanup{dir};
  const fs::path model_dir = write_model(dir);
  caf::actor_system system{test_config()};
  caf::scoped_actor self{system};
  auto rollout = spawn_rollout(system, model_dir, Precision::FP32);
  auto reference = spawn_reference(system, model_dir, Precision::FP32);
  auto reward = spawn_reward_model(system, model_dir, Precision::FP32);
  msg::GenerationRequest req;
  req.request_id = 7;
  req.prompt_ids = {0, 5, 9, 12};
  req.sampling.temperature = 1.0f;
  req.sampling.top_k = 10;
  req.sampling.max_new_tokens = 6;
  req.sampling.seed = 99;
  req.samples = 2;
  const auto first = ask<std::vector<Envelope>>(self, rollout, nullptr, generate_atom::value, wrap(req));
  const auto again = ask<std::vector<Envelope>>(self, rollout, nullptr, generate_atom::value, wrap(req));
  ASSERT_TRUE(first && again);
  ASSERT_EQ(first->size(), 2u);
  for (size_t s = 0; s < 2; ++s) {
    const auto a = unwrap<msg::Rollout>((*first)[s]), b = unwrap<msg::Rollout>((*again)[s]);
    EXPECT_EQ(a, b) << "a replayed request generates the same responses";
    EXPECT_EQ(a.sample_index, s);
    EXPECT_EQ(a.response_ids.size(), 6u);
    EXPECT_EQ(a.finish_reason, msg::FinishReason::Length);
  }
  // Greedy: the reference recomputes the generator's log-probabilities (temperature 1) in one forward over the
  // whole sequence instead of one per prefix; the GEMMs then see other row counts, so the logits may differ in
  // the last bits (FP32): 1e-4 nats.
  req.sampling.temperature = 0;
  req.samples = 1;
  const auto greedy = ask<std::vector<Envelope>>(self, rollout, nullptr, generate_atom::value, wrap(req));
  ASSERT_TRUE(greedy);
  const auto g = unwrap<msg::Rollout>(greedy->front());
  const auto scored = ask<Envelope>(self, reference, nullptr, logprobs_atom::value, greedy->front());
  ASSERT_TRUE(scored);
  const auto ref = unwrap<msg::Rollout>(*scored);
  ASSERT_EQ(ref.log_probs.size(), g.log_probs.size());
  double mean = 0;
  for (size_t j = 0; j < g.log_probs.size(); ++j) {
    EXPECT_NEAR(ref.log_probs[j], g.log_probs[j], 1e-4) << j;
    mean += ref.log_probs[j];
  }
  mean /= static_cast<double>(ref.log_probs.size());
  const auto score = ask<Envelope>(self, reward, nullptr, score_atom::value, greedy->front());
  ASSERT_TRUE(score);
  const auto s = unwrap<msg::RewardScore>(*score);
  EXPECT_EQ(s.request_id, 7u);
  EXPECT_EQ(s.scorer, "reward_model/0");
  EXPECT_NEAR(s.score, mean, 1e-6);  // the same forward, summed in double then rounded to float
  // A request for weights the rollout does not hold yet.
  req.policy_version.version = 3;
  caf::error err;
  EXPECT_FALSE(ask<std::vector<Envelope>>(self, rollout, &err, generate_atom::value, wrap(req)));
  const auto e = actor_error_of(err);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->code, msg::ErrorCode::StaleVersion);
  EXPECT_EQ(ask<uint64_t>(self, rollout, nullptr, weights_atom::value, model_dir.string(), uint64_t{3}, uint64_t{30}), 3u);
  const auto fresh = ask<std::vector<Envelope>>(self, rollout, nullptr, generate_atom::value, wrap(req));
  ASSERT_TRUE(fresh);
  EXPECT_EQ(unwrap<msg::Rollout>(fresh->front()).policy_version, (msg::PolicyVersion{3, 30}));
}

}  // namespace
}  // namespace moerl::actors
