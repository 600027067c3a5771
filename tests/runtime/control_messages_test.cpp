// schemas/control.capnp through runtime/messages/control.hpp: bit-exact round trips, each documented rule
// enforced with the kind and field named, and hostile input (random bytes, truncations) rejected with Error.
#include "runtime/messages/control.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "runtime/error.hpp"

namespace moerl::msg {
namespace {

TokenBatch batch(uint64_t step, uint32_t rows, uint32_t seq) {
  TokenBatch b{StepId{"run/pretrain", step}, rows, seq, {}, {}};
  for (uint32_t i = 0; i < rows * seq; ++i) {
    b.ids.push_back(static_cast<int32_t>(i % 50));
    b.labels.push_back(i % 3 ? static_cast<int32_t>((i + 1) % 50) : kNoLossLabel);
  }
  return b;
}

// Field by field: GCC 12 warns (-Wmaybe-uninitialized, a false positive) on nested aggregate initialization here.
StageData stage_data(uint32_t stage, std::vector<TokenBatch> validation, bool has_bigram, double bigram) {
  StageData d;
  d.stage = stage;
  d.position = LoaderPosition{7, 0, 0, StepId{"run/sft", 0}};
  d.validation = std::move(validation);
  d.has_bigram = has_bigram;
  d.bigram_validation_loss = bigram;
  return d;
}

template <class T, class Decode>
void expect_round_trip(const T& x, Decode decode) {
  EXPECT_EQ(decode(encode(x), DecodeLimits{}), x);
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(ControlMessages, RoundTripBitExactly) {
  expect_round_trip(LoaderPosition{7, 2, 13, StepId{"run/pretrain", 40}}, decode_loader_position);
  expect_round_trip(DatasetInfo{"/runs/x/tokenizer.model", 2000, 0, 1, 2, 123456, 7890}, decode_dataset_info);
  expect_round_trip(stage_data(1, {batch(0, 2, 4), batch(0, 1, 3)}, true, 5.125), decode_stage_data);
  expect_round_trip(EvalRequest{StepId{"run/pretrain", 9}, {batch(0, 2, 4)}}, decode_eval_request);
  expect_round_trip(EvalResult{StepId{"run/pretrain", 9}, 3.25, 96}, decode_eval_result);
  expect_round_trip(CheckpointRequest{"/runs/x/pretrain", StepId{"run/pretrain", 100}, R"({"step": 100})"},
                    decode_checkpoint_request);
  expect_round_trip(RewardScore{11, 3, -1.5f, "reward_model/0"}, decode_reward_score);
}

TEST(ControlMessages, EnforceTheSchemaRulesNamingKindAndField) {
  EXPECT_NE(error_of([] { decode_loader_position(encode(LoaderPosition{1, -1, 0, {}})); }).find("LoaderPosition.epoch"),
            std::string::npos);
  EXPECT_NE(error_of([] { decode_dataset_info(encode(DatasetInfo{"t", 10, 0, 10, 2, 0, 0})); }).find("DatasetInfo.eosId"),
            std::string::npos);
  EXPECT_NE(error_of([] { decode_eval_request(encode(EvalRequest{StepId{"r", 1}, {}})); }).find("EvalRequest.batches"),
            std::string::npos);
  TokenBatch bad = batch(0, 1, 4);
  bad.ids[2] = 999;
  DecodeLimits vocab50;
  vocab50.vocab = 50;
  const std::string nested = error_of([&] { decode_eval_request(encode(EvalRequest{StepId{"r", 1}, {batch(0, 1, 4), bad}}), vocab50); });
  EXPECT_NE(nested.find("EvalRequest.batches[1]: TokenBatch.ids[2]"), std::string::npos) << nested;
  EXPECT_NE(error_of([] { decode_eval_result(encode(EvalResult{{}, NAN, 0})); }).find("EvalResult.loss"), std::string::npos);
  EXPECT_NE(error_of([] { decode_stage_data(encode(stage_data(0, {}, true, -1))); }).find("bigramValidationLoss"),
            std::string::npos);
  EXPECT_NE(error_of([] { decode_checkpoint_request(encode(CheckpointRequest{"", StepId{"r", 1}, "{}"})); })
                .find("CheckpointRequest.folder"),
            std::string::npos);
  // The micro-batches share the token budget.
  DecodeLimits small;
  small.max_batch_tokens = 10;
  EXPECT_NE(error_of([&] { decode_eval_request(encode(EvalRequest{StepId{"r", 1}, {batch(0, 1, 6), batch(0, 1, 6)}}), small); })
                .find("EvalRequest.batches[1]"),
            std::string::npos);
}

TEST(ControlMessages, RejectRandomAndTruncatedInputWithoutCrashing) {
  std::mt19937_64 rng(17);
  const std::vector<uint8_t> valid = encode(stage_data(0, {batch(0, 2, 8)}, true, 1.0));
  int rejected = 0;
  for (int i = 0; i < 3000; ++i) {
    std::vector<uint8_t> bytes;
    if (i % 3 == 0) {  // random words
      bytes.resize(8 * (1 + rng() % 24));
      for (auto& b : bytes) b = static_cast<uint8_t>(rng());
    } else if (i % 3 == 1) {  // truncated
      bytes.assign(valid.begin(), valid.begin() + static_cast<long>(rng() % valid.size()));
    } else {  // one byte flipped
      bytes = valid;
      bytes[rng() % bytes.size()] ^= static_cast<uint8_t>(1 + rng() % 255);
    }
    for (auto decode : {+[](std::span<const uint8_t> b) { decode_stage_data(b); },
                        +[](std::span<const uint8_t> b) { decode_eval_request(b); },
                        +[](std::span<const uint8_t> b) { decode_checkpoint_request(b); }}) {
      try {
        decode(bytes);
      } catch (const Error&) {
        ++rejected;
      }
    }
  }
  EXPECT_GT(rejected, 3000);  // most inputs are malformed; none may escape as another exception or crash
}

}  // namespace
}  // namespace moerl::msg
