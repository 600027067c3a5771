#include <capnp/message.h>
#include <capnp/serialize.h>
#include <gtest/gtest.h>
#include <kj/io.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <random>

#include "runtime/error.hpp"
#include "runtime/messages/bench.hpp"
#include "runtime/messages/codec.hpp"
#include "runtime/messages/wire.hpp"

namespace moerl::msg {
namespace {

using Bytes = std::vector<uint8_t>;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

DecodeLimits vocab_limits() {
  DecodeLimits l;
  l.vocab = 1000;
  return l;
}

// The message of the moerl::Error that `f` throws; fails the test when it throws nothing.
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "accepted without error";
  return "";
}
#define EXPECT_ERROR(expr, substr)                                                                      \
  do {                                                                                                  \
    const std::string m_ = error_of([&] { (void)(expr); });                                             \
    EXPECT_NE(m_.find(substr), std::string::npos) << "error '" << m_ << "' lacks '" << (substr) << "'"; \
  } while (0)

// Re-encodes `bytes` after `edit` changed the root through Cap'n Proto's own builder: for values the plain
// structs cannot hold (unknown enum values, schema versions).
template <class Wire, class Edit>
Bytes edit_wire(const Bytes& bytes, Edit edit) {
  kj::Array<capnp::word> words = kj::heapArray<capnp::word>(bytes.size() / 8);
  std::memcpy(words.begin(), bytes.data(), bytes.size());
  capnp::MallocMessageBuilder message;
  capnp::initMessageBuilderFromFlatArrayCopy(words, message);
  edit(message.getRoot<Wire>());
  kj::Array<capnp::word> out = capnp::messageToFlatArray(message);
  auto b = out.asBytes();
  return Bytes(b.begin(), b.end());
}

// One valid instance of every kind (token ids < 1000, the vocabulary of vocab_limits()).
const StepId kStep{"run-a", 7};
const PolicyVersion kPolicy{3, 6};
TensorRef sample_tensor_ref() {
  return {"stage2/activations", DType::BF16,      {2, 48, 512}, Device::CUDA,     1, 3,
          Transport::Nccl,      Collective::Send, "pp",         2 * 48 * 512 * 2, {}};
}
TensorRef sample_inline_tensor() {
  return {"router.bias",
          DType::F32,
          {2, 3},
          Device::CPU,
          0,
          0,
          Transport::Inline,
          Collective::None,
          "",
          24,
          Bytes{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24}};
}
ActorError sample_actor_error() { return {ErrorCode::StaleVersion, "policy version 2 < 3", "rollout/0", kStep}; }
TokenBatch sample_batch() { return {kStep, 2, 4, {1, 2, 3, 4, 5, 6, 7, 999}, {-100, -100, 4, 5, 6, 7, 8, 0}}; }
TrainStep sample_train_step() { return {kStep, {sample_batch(), sample_batch()}, 3e-4}; }
TrainStepResult sample_result() {
  return {kStep, 2.5, 2.75, 0.0125, 1.25, 3e-4, 640, false, {{1, {3, 5, 0, 8}}, {3, {4, 4, 4, 4}}}};
}
CheckpointManifest sample_manifest() {
  return {"runs/a/checkpoints/step-7",
          kStep,
          {{"model.safetensors", 123456, ChecksumKind::Sha256, Bytes(32, 0xab)},
           {"tok/tokenizer.model", 789, ChecksumKind::Crc32c, Bytes{1, 2, 3, 4}}}};
}
GenerationRequest sample_request() { return {42, {1, 2, 3}, {0.7f, 0.95f, 50, 16, {2}, 1234}, kPolicy, 8}; }
Rollout sample_rollout() {
  return {42, 5, {1, 2, 3}, {10, 11, 2}, {-0.5f, -1.25f, -0.0f}, kPolicy, FinishReason::Stop};
}
Utterance prompt_u() { return {"What is 2+2?", {5, 6}}; }
Comparison sample_comparison() {
  return {1,       prompt_u(), {"4", {7}}, {"5", {}}, Choice::FirstChosen, "annotator-17", 1764300000123456789,
          kPolicy, {2, 5}};
}
Rating sample_rating() { return {1, prompt_u(), {"4", {7}}, 6.5f, 1, 7, "annotator-3", 1764300000000000000, kPolicy}; }
Correction sample_correction() { return {1, prompt_u(), {"5", {8}}, "4", "annotator-3", 1764300000000000001, kPolicy}; }
ReplayRecord sample_replay() { return {1, sample_rollout(), 0.8f, {}, {0.5f, 0.5f, 0.5f}, 99, kStep}; }

// decode(encode(x)) == x, and encoding the decoded struct gives the same bytes (floats bit for bit, -0.0 too).
template <class T, class Decode>
void expect_round_trip(const T& x, Decode decode) {
  const Bytes bytes = encode(x);
  EXPECT_EQ(bytes.size() % 8, 0u);
  const T back = decode(bytes, vocab_limits());
  EXPECT_TRUE(back == x);
  EXPECT_EQ(encode(back), bytes);
}

TEST(Messages, EveryKindRoundTripsBitExactly) {
  expect_round_trip(sample_tensor_ref(), decode_tensor_ref);
  expect_round_trip(sample_inline_tensor(), decode_tensor_ref);
  expect_round_trip(sample_actor_error(), decode_actor_error);
  expect_round_trip(sample_batch(), decode_token_batch);
  expect_round_trip(sample_train_step(), decode_train_step);
  expect_round_trip(sample_result(), decode_train_step_result);
  expect_round_trip(sample_manifest(), decode_checkpoint_manifest);
  expect_round_trip(sample_request(), decode_generation_request);
  expect_round_trip(sample_rollout(), decode_rollout);
  expect_round_trip(sample_comparison(), decode_comparison);
  expect_round_trip(sample_rating(), decode_rating);
  expect_round_trip(sample_correction(), decode_correction);
  expect_round_trip(sample_replay(), decode_replay_record);
  const Bytes rollout = encode(sample_rollout());
  EXPECT_TRUE(std::signbit(decode_rollout(rollout).log_probs[2]));
}

TEST(Messages, SkippedStepKeepsItsNonFiniteLossBitForBit) {
  TrainStepResult r = sample_result();
  r.skipped = true;
  r.loss = std::numeric_limits<double>::quiet_NaN();
  r.grad_norm = std::numeric_limits<double>::infinity();
  const Bytes bytes = encode(r);
  const TrainStepResult back = decode_train_step_result(bytes);
  EXPECT_TRUE(std::isnan(back.loss));
  EXPECT_EQ(back.grad_norm, r.grad_norm);
  EXPECT_EQ(encode(back), bytes);
}

TEST(Messages, UnalignedInputIsCopiedAndDecodes) {
  const Bytes bytes = encode(sample_batch());
  std::vector<uint8_t> shifted(bytes.size() + 1);
  std::memcpy(shifted.data() + 1, bytes.data(), bytes.size());
  EXPECT_TRUE(decode_token_batch(std::span<const uint8_t>(shifted).subspan(1)) == sample_batch());
}

TEST(Messages, FramingErrorsNameTheKind) {
  const Bytes bytes = encode(sample_rollout());
  EXPECT_ERROR(decode_rollout(Bytes{}), "Rollout: 0 bytes");
  EXPECT_ERROR(decode_rollout(std::span<const uint8_t>(bytes).first(bytes.size() - 3)), "multiple of 8");
  EXPECT_ERROR(decode_rollout(std::span<const uint8_t>(bytes).first(bytes.size() - 8)), "Rollout: malformed");
  Bytes trailing = bytes;
  trailing.resize(bytes.size() + 16);
  EXPECT_ERROR(decode_rollout(trailing), "16 bytes after the end");
  Bytes huge_segment = bytes;
  huge_segment[4] = huge_segment[5] = huge_segment[6] = 0xff;  // first segment's size in words
  EXPECT_ERROR(decode_rollout(huge_segment), "Rollout: malformed");
  // A struct pointer read where a list is expected: a Rollout is not a TokenBatch.
  EXPECT_ERROR(decode_token_batch(encode(sample_comparison())), "TokenBatch");
}

TEST(Messages, TensorRefRulesNameTheField) {
  const auto reject = [](const std::function<void(TensorRef&)>& edit, const char* what,
                         TensorRef x = sample_tensor_ref()) {
    SCOPED_TRACE(what);
    edit(x);
    EXPECT_ERROR(decode_tensor_ref(encode(x)), what);
  };
  reject([](TensorRef& x) { x.name.clear(); }, "TensorRef.name: empty");
  reject([](TensorRef& x) { x.shape = {2, -48, 512}; }, "TensorRef.shape[1]: -48");
  reject([](TensorRef& x) { x.shape = Shape(9, 1); }, "TensorRef.shape: 9 entries, at most 8");
  reject([](TensorRef& x) { x.shape = {1LL << 40, 1LL << 40}; }, "overflows");
  reject([](TensorRef& x) { x.byte_size += 2; }, "TensorRef.byteSize: 98306, expected 98304 for BF16 [2, 48, 512]");
  reject([](TensorRef& x) { x.device = Device::CPU; }, "TensorRef.deviceIndex: 1, expected 0");
  reject([](TensorRef& x) { x.device_index = 0, x.device = Device::CPU; }, "TensorRef.device: cpu, expected cuda");
  reject([](TensorRef& x) { x.collective = Collective::None; }, "TensorRef.collective: none, expected a collective");
  reject([](TensorRef& x) { x.group.clear(); }, "TensorRef.group: empty");
  reject([](TensorRef& x) { x.inline_data = {1}; }, "TensorRef.inlineData: 1 bytes, expected none");
  reject([](TensorRef& x) { x.inline_data.pop_back(); }, "TensorRef.inlineData: 23 bytes, expected byteSize = 24",
         sample_inline_tensor());
  reject([](TensorRef& x) { x.collective = Collective::Broadcast; }, "TensorRef.collective: expected none",
         sample_inline_tensor());
  DecodeLimits small;
  small.max_inline_bytes = 16;
  EXPECT_ERROR(decode_tensor_ref(encode(sample_inline_tensor()), small), "TensorRef.inlineData: 24 bytes, at most 16");
  const Bytes bad_dtype =
      edit_wire<wire::TensorRef>(encode(sample_tensor_ref()), [](auto b) { b.setDtype(static_cast<wire::DType>(7)); });
  EXPECT_ERROR(decode_tensor_ref(bad_dtype), "TensorRef.dtype: unknown enum value 7");
  const Bytes bad_transport = edit_wire<wire::TensorRef>(
      encode(sample_tensor_ref()), [](auto b) { b.setTransport(static_cast<wire::Transport>(9)); });
  EXPECT_ERROR(decode_tensor_ref(bad_transport), "TensorRef.transport: unknown enum value 9");
}

TEST(Messages, ActorErrorNeedsAKnownCodeAndAMessage) {
  ActorError e = sample_actor_error();
  e.message.clear();
  EXPECT_ERROR(decode_actor_error(encode(e)), "ActorError.message: empty");
  const Bytes bad = edit_wire<wire::ActorError>(encode(sample_actor_error()),
                                                [](auto b) { b.setCode(static_cast<wire::ErrorCode>(5)); });
  EXPECT_ERROR(decode_actor_error(bad), "ActorError.code: unknown enum value 5");
}

TEST(Messages, TokenBatchSizesAndTokenIdsAreChecked) {
  const DecodeLimits l = vocab_limits();
  const auto reject = [&](const std::function<void(TokenBatch&)>& edit, const char* what) {
    SCOPED_TRACE(what);
    TokenBatch x = sample_batch();
    edit(x);
    EXPECT_ERROR(decode_token_batch(encode(x), l), what);
  };
  reject([](TokenBatch& x) { x.batch = 0; }, "TokenBatch.batch: 0");
  reject([](TokenBatch& x) { x.seq = 0; }, "TokenBatch.seq: 0");
  reject([](TokenBatch& x) { x.seq = 3; }, "TokenBatch.ids: 8 entries, expected batch * seq = 6");
  reject([](TokenBatch& x) { x.labels.pop_back(); }, "TokenBatch.labels: 7 entries, expected batch * seq = 8");
  reject([](TokenBatch& x) { x.ids[5] = 1000; }, "TokenBatch.ids[5]: 1000 is not a token id in [0, 1000)");
  reject([](TokenBatch& x) { x.ids[0] = -100; }, "TokenBatch.ids[0]: -100");
  reject([](TokenBatch& x) { x.labels[2] = -5; }, "TokenBatch.labels[2]: -5");
  reject([](TokenBatch& x) { x.labels[7] = 5000; }, "TokenBatch.labels[7]: 5000");
  TokenBatch big = sample_batch();
  big.ids[5] = 5000;
  EXPECT_NO_THROW(decode_token_batch(encode(big)));  // no vocabulary given: only ids >= 0 are required
  DecodeLimits tight = l;
  tight.max_batch_tokens = 7;
  EXPECT_ERROR(decode_token_batch(encode(sample_batch()), tight),
               "TokenBatch: batch * seq = 8 tokens, more than the 7");
}

TEST(Messages, TrainStepChecksItsStepMicroBatchesAndLearningRate) {
  const DecodeLimits l = vocab_limits();
  const auto reject = [&](const std::function<void(TrainStep&)>& edit, const char* what, DecodeLimits lim) {
    SCOPED_TRACE(what);
    TrainStep x = sample_train_step();
    edit(x);
    EXPECT_ERROR(decode_train_step(encode(x), lim), what);
  };
  reject([](TrainStep& x) { x.batches.clear(); }, "TrainStep.batches: empty", l);
  reject([](TrainStep& x) { x.step.step = 0; }, "TrainStep.step.step: 0", l);
  reject([](TrainStep& x) { x.step.run.clear(); }, "TrainStep.step.run: empty", l);
  reject([](TrainStep& x) { x.batches[1].step.step = 6; },
         "TrainStep.batches[1].step: run-a/6, expected the command's step run-a/7", l);
  reject([](TrainStep& x) { x.batches[1].ids[0] = 1000; }, "TrainStep.batches[1].ids[0]: 1000", l);
  reject([](TrainStep& x) { x.learning_rate = std::nan(""); }, "TrainStep.learningRate: nan", l);
  reject([](TrainStep& x) { x.learning_rate = -1e-3; }, "TrainStep.learningRate: -0.001", l);
  DecodeLimits tight = l;
  tight.max_batch_tokens = 12;  // the two micro-batches hold 16 together
  reject([](TrainStep&) {}, "TrainStep.batches[1]: batch * seq = 8 tokens, more than the 4 allowed", tight);
  tight = l;
  tight.max_micro_batches = 1;
  reject([](TrainStep&) {}, "TrainStep.batches: 2 micro-batches, at most 1", tight);
}

TEST(Messages, TrainStepResultMustBeFiniteUnlessSkipped) {
  const auto reject = [](const std::function<void(TrainStepResult&)>& edit, const char* what) {
    SCOPED_TRACE(what);
    TrainStepResult x = sample_result();
    edit(x);
    EXPECT_ERROR(decode_train_step_result(encode(x)), what);
  };
  reject([](TrainStepResult& x) { x.loss = std::nan(""); }, "TrainStepResult.loss: nan");
  reject([](TrainStepResult& x) { x.mtp_loss = INFINITY; }, "TrainStepResult.mtpLoss: inf");
  reject([](TrainStepResult& x) { x.grad_norm = -1; }, "TrainStepResult.gradNorm: -1.0");
  reject([](TrainStepResult& x) { x.learning_rate = INFINITY; }, "TrainStepResult.learningRate: inf");
  reject([](TrainStepResult& x) { x.expert_load[1].layer = 1; },
         "TrainStepResult.expertLoad[1].layer: 1, expected layers in ascending order");
  reject([](TrainStepResult& x) { x.expert_load[1].tokens_per_expert.pop_back(); },
         "TrainStepResult.expertLoad[1].tokensPerExpert: 3 experts, expected 4");
  reject([](TrainStepResult& x) { x.expert_load[0].tokens_per_expert.clear(); },
         "TrainStepResult.expertLoad[0].tokensPerExpert: empty");
  DecodeLimits tight;
  tight.max_layers = 1;
  EXPECT_ERROR(decode_train_step_result(encode(sample_result()), tight),
               "TrainStepResult.expertLoad: 2 layers, at most 1");
  tight = {};
  tight.max_experts = 3;
  EXPECT_ERROR(decode_train_step_result(encode(sample_result()), tight), "tokensPerExpert: 4 entries, at most 3");
}

TEST(Messages, CheckpointManifestPathsStayInsideTheFolder) {
  const auto reject = [](const std::function<void(CheckpointManifest&)>& edit, const char* what) {
    SCOPED_TRACE(what);
    CheckpointManifest x = sample_manifest();
    edit(x);
    EXPECT_ERROR(decode_checkpoint_manifest(encode(x)), what);
  };
  reject([](CheckpointManifest& x) { x.folder.clear(); }, "CheckpointManifest.folder: empty");
  reject([](CheckpointManifest& x) { x.files.clear(); }, "CheckpointManifest.files: empty");
  reject([](CheckpointManifest& x) { x.files[1].path = "/etc/passwd"; },
         "CheckpointManifest.files[1].path: '/etc/passwd' is absolute");
  reject([](CheckpointManifest& x) { x.files[1].path = "tok/../../x"; },
         "files[1].path: 'tok/../../x' leaves the folder");
  reject([](CheckpointManifest& x) { x.files[0].path = ".."; }, "files[0].path: '..' leaves the folder");
  reject([](CheckpointManifest& x) { x.files[1].path = x.files[0].path; },
         "files[1].path: 'model.safetensors' is listed twice");
  reject([](CheckpointManifest& x) { x.files[0].checksum.resize(4); },
         "files[0].checksum: 4 bytes, expected 32 for sha256");
  reject([](CheckpointManifest& x) { x.files[1].checksum.resize(32); },
         "files[1].checksum: 32 bytes, expected 4 for crc32c");
  const Bytes bad = edit_wire<wire::CheckpointManifest>(
      encode(sample_manifest()), [](auto b) { b.getFiles()[0].setChecksumKind(static_cast<wire::ChecksumKind>(2)); });
  EXPECT_ERROR(decode_checkpoint_manifest(bad), "CheckpointManifest.files[0].checksumKind: unknown enum value 2");
  CheckpointManifest dots = sample_manifest();
  dots.files[0].path = "a..b/..c";  // '..' only as a whole component is refused
  EXPECT_NO_THROW(decode_checkpoint_manifest(encode(dots)));
}

TEST(Messages, GenerationRequestSamplingParamsAreInRange) {
  const DecodeLimits l = vocab_limits();
  const auto reject = [&](const std::function<void(GenerationRequest&)>& edit, const char* what) {
    SCOPED_TRACE(what);
    GenerationRequest x = sample_request();
    edit(x);
    EXPECT_ERROR(decode_generation_request(encode(x), l), what);
  };
  reject([](GenerationRequest& x) { x.prompt_ids.clear(); }, "GenerationRequest.promptIds: empty");
  reject([](GenerationRequest& x) { x.prompt_ids[1] = 1000; }, "GenerationRequest.promptIds[1]: 1000");
  reject([](GenerationRequest& x) { x.sampling.temperature = -0.5f; }, "GenerationRequest.sampling.temperature: -0.5");
  reject([](GenerationRequest& x) { x.sampling.temperature = kNaN; }, "GenerationRequest.sampling.temperature: nan");
  reject([](GenerationRequest& x) { x.sampling.top_p = 0; }, "GenerationRequest.sampling.topP: 0.0");
  reject([](GenerationRequest& x) { x.sampling.top_p = 1.5f; }, "GenerationRequest.sampling.topP: 1.5");
  reject([](GenerationRequest& x) { x.sampling.top_k = 1001; }, "GenerationRequest.sampling.topK: 1001");
  reject([](GenerationRequest& x) { x.sampling.max_new_tokens = 0; }, "GenerationRequest.sampling.maxNewTokens: 0");
  reject([](GenerationRequest& x) { x.sampling.stop_ids = {2, 1000}; }, "GenerationRequest.sampling.stopIds[1]: 1000");
  reject([](GenerationRequest& x) { x.samples = 0; }, "GenerationRequest.samples: 0");
  reject([](GenerationRequest& x) { x.samples = 1025; }, "GenerationRequest.samples: 1025");
}

TEST(Messages, RolloutHasOneFiniteLogProbPerResponseToken) {
  const DecodeLimits l = vocab_limits();
  const auto reject = [&](const std::function<void(Rollout&)>& edit, const char* what) {
    SCOPED_TRACE(what);
    Rollout x = sample_rollout();
    edit(x);
    EXPECT_ERROR(decode_rollout(encode(x), l), what);
  };
  reject([](Rollout& x) { x.log_probs.pop_back(); },
         "Rollout.logProbs: 2 entries, expected one per response token (3)");
  reject([](Rollout& x) { x.log_probs[1] = 0.25f; }, "Rollout.logProbs[1]: 0.25");
  reject([](Rollout& x) { x.log_probs[0] = -kInf; }, "Rollout.logProbs[0]: -inf");
  reject([](Rollout& x) { x.log_probs[2] = kNaN; }, "Rollout.logProbs[2]: nan");
  reject([](Rollout& x) { x.response_ids[2] = 1000; }, "Rollout.responseIds[2]: 1000");
  reject([](Rollout& x) { x.prompt_ids.clear(); }, "Rollout.promptIds: empty");
  reject([](Rollout& x) { x.response_ids.clear(), x.log_probs.clear(); },
         "Rollout.responseIds: empty, expected at least one token unless");
  Rollout aborted = sample_rollout();
  aborted.response_ids.clear(), aborted.log_probs.clear(), aborted.finish_reason = FinishReason::Aborted;
  EXPECT_TRUE(decode_rollout(encode(aborted), l) == aborted);
  const Bytes bad = edit_wire<wire::Rollout>(encode(sample_rollout()),
                                             [](auto b) { b.setFinishReason(static_cast<wire::FinishReason>(3)); });
  EXPECT_ERROR(decode_rollout(bad), "Rollout.finishReason: unknown enum value 3");
}

TEST(Messages, FeedbackRecordsRefuseUnknownSchemaVersions) {
  for (uint32_t version : {0u, 2u}) {
    Comparison c = sample_comparison();
    c.schema_version = version;
    EXPECT_ERROR(decode_comparison(encode(c)),
                 "Comparison.schemaVersion: version " + std::to_string(version) + " is not known");
    Rating r = sample_rating();
    r.schema_version = version;
    EXPECT_ERROR(decode_rating(encode(r)), "Rating.schemaVersion");
    Correction k = sample_correction();
    k.schema_version = version;
    EXPECT_ERROR(decode_correction(encode(k)), "Correction.schemaVersion");
    ReplayRecord p = sample_replay();
    p.schema_version = version;
    EXPECT_ERROR(decode_replay_record(encode(p)), "ReplayRecord.schemaVersion");
  }
}

TEST(Messages, FeedbackRecordRulesNameTheField) {
  const DecodeLimits l = vocab_limits();
  Comparison c = sample_comparison();
  c.first.text.clear();
  EXPECT_ERROR(decode_comparison(encode(c), l), "Comparison.first.text: empty");
  c = sample_comparison();
  c.second.ids = {1000};
  EXPECT_ERROR(decode_comparison(encode(c), l), "Comparison.second.ids[0]: 1000");
  c = sample_comparison();
  c.annotator.clear();
  EXPECT_ERROR(decode_comparison(encode(c), l), "Comparison.annotator: empty");
  c = sample_comparison();
  c.timestamp_ns = -1;
  EXPECT_ERROR(decode_comparison(encode(c), l), "Comparison.timestampNs: -1");
  const Bytes bad_choice = edit_wire<wire::Comparison>(encode(sample_comparison()),
                                                       [](auto b) { b.setChoice(static_cast<wire::Choice>(3)); });
  EXPECT_ERROR(decode_comparison(bad_choice), "Comparison.choice: unknown enum value 3");

  Rating r = sample_rating();
  r.score = 7.5f;
  EXPECT_ERROR(decode_rating(encode(r)), "Rating.score: 7.5");
  r.score = kNaN;
  EXPECT_ERROR(decode_rating(encode(r)), "Rating.score: nan");
  r = sample_rating();
  r.scale_max = r.scale_min;
  EXPECT_ERROR(decode_rating(encode(r)), "Rating.scaleMax: 1.0");
  r = sample_rating();
  r.scale_min = -kInf;
  EXPECT_ERROR(decode_rating(encode(r)), "Rating.scaleMin: -inf");

  Correction k = sample_correction();
  k.corrected.clear();
  EXPECT_ERROR(decode_correction(encode(k)), "Correction.corrected: empty");

  ReplayRecord p = sample_replay();
  p.advantages.pop_back();
  EXPECT_ERROR(decode_replay_record(encode(p)),
               "ReplayRecord.advantages: 2 entries, expected one per response token (3)");
  p = sample_replay();
  p.rewards = {0.1f, 0.2f};
  EXPECT_ERROR(decode_replay_record(encode(p)),
               "ReplayRecord.rewards: 2 entries, expected none or one per response token");
  p.rewards = {0.1f, kInf, 0.2f};
  EXPECT_ERROR(decode_replay_record(encode(p)), "ReplayRecord.rewards[1]: inf");
  p = sample_replay();
  p.advantages[0] = kNaN;
  EXPECT_ERROR(decode_replay_record(encode(p)), "ReplayRecord.advantages[0]: nan");
  p = sample_replay();
  p.score = kInf;
  EXPECT_ERROR(decode_replay_record(encode(p)), "ReplayRecord.score: inf");
  p = sample_replay();
  p.rollout.log_probs[0] = 1;
  EXPECT_ERROR(decode_replay_record(encode(p)), "ReplayRecord.rollout.logProbs[0]: 1.0");
}

TEST(Messages, TextAndNameLengthsAreLimited) {
  DecodeLimits l;
  l.max_text_bytes = 8;
  l.max_name_bytes = 4;
  Comparison c = sample_comparison();
  c.annotator = "ann";
  EXPECT_ERROR(decode_comparison(encode(c), l), "Comparison.prompt.text: 12 bytes, at most 8");
  EXPECT_ERROR(decode_actor_error(encode(sample_actor_error()), l), "ActorError.message: 20 bytes, at most 8");
  EXPECT_ERROR(decode_token_batch(encode(sample_batch()), l), "TokenBatch.step.run: 5 bytes, at most 4");
}

// Small limits, and the largest message of each kind they allow: every list and text at its maximum.
DecodeLimits small_limits() {
  DecodeLimits l;
  l.max_batch_tokens = 96, l.max_sequence = 40, l.max_text_bytes = 100, l.max_name_bytes = 20;
  l.max_inline_bytes = 64, l.max_dims = 4, l.max_micro_batches = 3, l.max_layers = 5, l.max_experts = 9;
  l.max_files = 6;
  return l;
}

TEST(Messages, TheLargestLegitimateMessageOfEachKindFitsItsTraversalLimit) {
  const DecodeLimits l = small_limits();
  const std::string name(20, 'n'), text(100, 't');
  const StepId step{name, 1};
  const std::vector<int32_t> seq(40, 1);
  const std::vector<float> lp(40, -1.0f);
  const auto fits = [&](MessageKind kind, const Bytes& bytes, const std::function<void()>& decode) {
    SCOPED_TRACE(std::string(kind_name(kind)));
    EXPECT_LE(bytes.size() / 8, traversal_limit_words(kind, l));
    EXPECT_NO_THROW(decode());
  };
  TensorRef t{name, DType::U8, {4, 4, 2, 2}, Device::CPU, 0, 0, Transport::Inline, Collective::None,
              name, 64,        Bytes(64, 7)};
  fits(MessageKind::TensorRef, encode(t), [&] { decode_tensor_ref(encode(t), l); });
  ActorError e{ErrorCode::Internal, text, name, step};
  fits(MessageKind::ActorError, encode(e), [&] { decode_actor_error(encode(e), l); });
  TokenBatch b{step, 8, 12, std::vector<int32_t>(96, 1), std::vector<int32_t>(96, 1)};
  fits(MessageKind::TokenBatch, encode(b), [&] { decode_token_batch(encode(b), l); });
  TrainStep s{step, {TokenBatch{step, 2, 16, std::vector<int32_t>(32, 1), std::vector<int32_t>(32, 1)}}, 1e-3};
  s.batches.resize(3, s.batches[0]);
  fits(MessageKind::TrainStep, encode(s), [&] { decode_train_step(encode(s), l); });
  TrainStepResult r{step, 1, 1, 1, 1, 1, 1, false, {}};
  for (uint32_t i = 0; i < 5; ++i) r.expert_load.push_back({i, std::vector<uint32_t>(9, 3)});
  fits(MessageKind::TrainStepResult, encode(r), [&] { decode_train_step_result(encode(r), l); });
  CheckpointManifest m{name, step, {}};
  for (int i = 0; i < 6; ++i)
    m.files.push_back({name.substr(0, 19) + char('a' + i), 1, ChecksumKind::Sha256, Bytes(32, 1)});
  fits(MessageKind::CheckpointManifest, encode(m), [&] { decode_checkpoint_manifest(encode(m), l); });
  GenerationRequest g{1, seq, {1, 1, 0, 40, seq, 0}, kPolicy, 1};
  fits(MessageKind::GenerationRequest, encode(g), [&] { decode_generation_request(encode(g), l); });
  Rollout ro{1, 0, seq, seq, lp, kPolicy, FinishReason::Length};
  fits(MessageKind::Rollout, encode(ro), [&] { decode_rollout(encode(ro), l); });
  const Utterance u{text, seq};
  Comparison c{1, u, u, u, Choice::Tie, name, 1, kPolicy, kPolicy};
  fits(MessageKind::Comparison, encode(c), [&] { decode_comparison(encode(c), l); });
  Rating ra{1, u, u, 1, 1, 2, name, 1, kPolicy};
  fits(MessageKind::Rating, encode(ra), [&] { decode_rating(encode(ra), l); });
  Correction co{1, u, u, text, name, 1, kPolicy};
  fits(MessageKind::Correction, encode(co), [&] { decode_correction(encode(co), l); });
  ReplayRecord rr{1, ro, 1, std::vector<float>(40, 0.5f), std::vector<float>(40, 0.5f), 1, step};
  fits(MessageKind::ReplayRecord, encode(rr), [&] { decode_replay_record(encode(rr), l); });
}

TEST(Messages, AListFarBeyondTheLimitsStopsAtTheTraversalLimit) {
  const DecodeLimits l = small_limits();
  Rollout x{1, 0, {1}, std::vector<int32_t>(50, 1), std::vector<float>(50, -1.0f), kPolicy, FinishReason::Length};
  // 50 > max_sequence = 40 but within the traversal limit: the field check names it.
  EXPECT_ERROR(decode_rollout(encode(x), l), "Rollout.responseIds: 50 entries, at most 40");
  // 1000 tokens exceed the whole message's traversal limit (~2 * 16 + 3 * 20 words): Cap'n Proto stops
  // reading before anything is copied.
  x.response_ids.assign(1000, 1), x.log_probs.assign(1000, -1.0f);
  EXPECT_ERROR(decode_rollout(encode(x), l), "traversal limit");
}

TEST(Messages, NestingLimitIsEnforced) {
  DecodeLimits l;
  l.nesting_limit = 2;  // ReplayRecord -> rollout -> promptIds needs 3 levels
  EXPECT_ERROR(decode_replay_record(encode(sample_replay()), l), "ReplayRecord: malformed");
  l.nesting_limit = 3;
  EXPECT_NO_THROW(decode_replay_record(encode(sample_replay()), l));
}

TEST(Messages, BatchRoundTripBenchmarkReturnsATime) {
  const double us = capnp_batch_roundtrip_us(64, 3);
  EXPECT_GT(us, 0.0);
  EXPECT_LT(us, 1e6);
}

// Fuzzing: mutations of valid encodings of every kind, each fed to its own decoder and to another kind's.
// Every input must either decode or throw moerl::Error; any other exception or a crash fails (the ASan +
// UBSan build runs this too). Deterministic seed, so a failure reproduces.
struct FuzzKind {
  Bytes valid;
  std::function<Bytes(std::span<const uint8_t>, const DecodeLimits&)> decode_reencode;
};

template <class Decode>
FuzzKind fuzz_kind(Bytes valid, Decode decode) {
  return {std::move(valid),
          [decode](std::span<const uint8_t> b, const DecodeLimits& l) { return encode(decode(b, l)); }};
}

Bytes mutate(const Bytes& valid, std::mt19937_64& rng) {
  Bytes b = valid;
  const auto pick = [&](uint64_t n) { return n == 0 ? 0 : rng() % n; };
  switch (rng() % 6) {
    case 0:  // flip 1..8 bits
      for (uint64_t i = 0, n = 1 + pick(8); i < n; ++i) b[pick(b.size())] ^= static_cast<uint8_t>(1u << pick(8));
      break;
    case 1:  // truncate anywhere (ragged lengths included)
      b.resize(pick(b.size()));
      break;
    case 2:  // random bytes of a random length
      b.resize(pick(2 * valid.size() + 16));
      for (auto& x : b) x = static_cast<uint8_t>(rng());
      break;
    case 3: {  // a word replaced by a list pointer with a huge element count and any element size
      const uint64_t word = 1 + pick(b.size() / 8 - 1);
      const uint32_t offset = static_cast<uint32_t>(static_cast<int32_t>(pick(64)) - 16);
      const uint32_t count = rng() % 2 ? (1u << 29) - 1 : static_cast<uint32_t>(pick(1u << 29));
      const uint64_t ptr = (uint64_t{(count << 3) | static_cast<uint32_t>(pick(8))} << 32) | ((offset << 2) | 1u);
      std::memcpy(b.data() + 8 * word, &ptr, 8);
      break;
    }
    case 4: {  // a huge segment count or segment size in the segment table
      const uint32_t v = rng() % 2 ? 0xffffffffu : static_cast<uint32_t>(rng());
      std::memcpy(b.data() + 4 * pick(2), &v, 4);
      break;
    }
    default:  // a random word overwritten with random bits (struct/far/other pointers, data)
      const uint64_t r = rng();
      std::memcpy(b.data() + 8 * pick(b.size() / 8), &r, 8);
  }
  return b;
}

TEST(Messages, FuzzedInputsEitherDecodeOrThrowMoerlError) {
  const std::vector<FuzzKind> kinds = {
      fuzz_kind(encode(sample_tensor_ref()), decode_tensor_ref),
      fuzz_kind(encode(sample_inline_tensor()), decode_tensor_ref),
      fuzz_kind(encode(sample_actor_error()), decode_actor_error),
      fuzz_kind(encode(sample_batch()), decode_token_batch),
      fuzz_kind(encode(sample_train_step()), decode_train_step),
      fuzz_kind(encode(sample_result()), decode_train_step_result),
      fuzz_kind(encode(sample_manifest()), decode_checkpoint_manifest),
      fuzz_kind(encode(sample_request()), decode_generation_request),
      fuzz_kind(encode(sample_rollout()), decode_rollout),
      fuzz_kind(encode(sample_comparison()), decode_comparison),
      fuzz_kind(encode(sample_rating()), decode_rating),
      fuzz_kind(encode(sample_correction()), decode_correction),
      fuzz_kind(encode(sample_replay()), decode_replay_record),
  };
  const DecodeLimits l = vocab_limits();
  std::mt19937_64 rng(20261128);
  constexpr int kInputs = 200000;
  int decoded = 0, rejected = 0;
  for (int i = 0; i < kInputs; ++i) {
    const FuzzKind& source = kinds[static_cast<size_t>(i) % kinds.size()];
    const Bytes input = mutate(source.valid, rng);
    // Mostly the kind's own decoder; every fourth input goes to another kind's.
    const FuzzKind& reader = i % 4 == 3 ? kinds[rng() % kinds.size()] : source;
    Bytes again;
    try {
      again = reader.decode_reencode(input, l);
    } catch (const Error&) {
      ++rejected;
      continue;
    } catch (const std::exception& e) {
      FAIL() << "input " << i << " threw a " << typeid(e).name() << ": " << e.what();
    } catch (...) {
      FAIL() << "input " << i << " threw something that is not a std::exception";
    }
    ++decoded;
    // What decodes is valid: its re-encoding decodes again, to the same bytes.
    Bytes twice;
    ASSERT_NO_THROW(twice = reader.decode_reencode(again, l)) << "input " << i;
    ASSERT_EQ(twice, again) << "input " << i;
  }
  EXPECT_EQ(decoded + rejected, kInputs);
  // Both outcomes occur (bit flips in data sections mostly still decode; random bytes never do).
  EXPECT_GT(decoded, kInputs / 100);
  EXPECT_GT(rejected, kInputs / 2);
  std::printf("[ fuzz     ] %d inputs: %d decoded, %d rejected with moerl::Error\n", kInputs, decoded, rejected);
}

}  // namespace
}  // namespace moerl::msg
