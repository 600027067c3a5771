// Encoding and validating decoding of the control-plane messages (schemas/*.capnp) to and from bytes.
//
// encode(x) writes one unpacked Cap'n Proto message (segment table + segments, a whole number of 8-byte
// words). decode_<kind>(bytes, limits) reads one back and checks it against the schema's documented
// rules (sizes, ranges, finiteness, known enum values and schemaVersion); any malformation, truncation,
// oversized list or violated rule throws moerl::Error naming the message kind and the field, e.g.
// "TokenBatch.ids: 12 entries, expected batch * seq = 16". Nothing a peer sends can crash the reader or
// escape as another exception type (kj::Exception from Cap'n Proto is converted).
//
// Input need not be aligned: an unaligned buffer is copied into 8-byte-aligned words first (Cap'n Proto
// reads words in place). The whole input must be exactly one message: trailing bytes are an error.
#pragma once
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "runtime/messages/types.hpp"

namespace moerl::msg {

// The largest messages a reader accepts. Each list or text is checked against its limit (by field), and
// the Cap'n Proto traversal limit of each kind is derived from these (traversal_limit_words), so a
// message that points many times at the same data (amplification) cannot make the reader walk more than
// the largest legitimate message of that kind.
struct DecodeLimits {
  int64_t vocab = 0;                     // token ids must be in [0, vocab); 0: only checked >= 0
  uint64_t max_batch_tokens = 1u << 22;  // batch * seq of a TokenBatch, and summed over a TrainStep
  uint64_t max_sequence = 1u << 17;      // tokens of a prompt, response, stop list or utterance
  uint64_t max_text_bytes = 1u << 20;    // human text: prompts, responses, corrections, error messages
  uint64_t max_name_bytes = 4096;        // names: runs, tensors, groups, actors, annotators, paths
  uint64_t max_inline_bytes = 1u << 20;  // TensorRef.inlineData (larger tensors go on the data plane)
  uint32_t max_dims = 8;                 // TensorRef.shape rank
  uint32_t max_micro_batches = 256;      // TrainStep.batches
  uint32_t max_layers = 256;             // TrainStepResult.expertLoad entries
  uint32_t max_experts = 1024;           // ExpertLoad.tokensPerExpert entries (DeepSeek-V3: 256)
  uint32_t max_files = 4096;             // CheckpointManifest.files
  uint32_t max_samples = 1024;           // GenerationRequest.samples
  int nesting_limit = 8;                 // deepest today: 3 levels (ReplayRecord.rollout.promptIds)
};

enum class MessageKind : uint8_t {
  TensorRef,
  ActorError,
  TokenBatch,
  TrainStep,
  TrainStepResult,
  CheckpointManifest,
  GenerationRequest,
  Rollout,
  Comparison,
  Rating,
  Correction,
  ReplayRecord,
};
inline constexpr int kMessageKinds = 12;

// The schema's struct name ("TokenBatch"): the name carried beside the bytes in an actor message.
std::string_view kind_name(MessageKind kind);

// The Cap'n Proto traversal limit used for `kind`: the words of the largest message of that kind that
// `limits` allow (every list and text at its maximum), plus struct overhead.
uint64_t traversal_limit_words(MessageKind kind, const DecodeLimits& limits);

std::vector<uint8_t> encode(const TensorRef& x);
std::vector<uint8_t> encode(const ActorError& x);
std::vector<uint8_t> encode(const TokenBatch& x);
std::vector<uint8_t> encode(const TrainStep& x);
std::vector<uint8_t> encode(const TrainStepResult& x);
std::vector<uint8_t> encode(const CheckpointManifest& x);
std::vector<uint8_t> encode(const GenerationRequest& x);
std::vector<uint8_t> encode(const Rollout& x);
std::vector<uint8_t> encode(const Comparison& x);
std::vector<uint8_t> encode(const Rating& x);
std::vector<uint8_t> encode(const Correction& x);
std::vector<uint8_t> encode(const ReplayRecord& x);

TensorRef decode_tensor_ref(std::span<const uint8_t> bytes, const DecodeLimits& limits = {});
ActorError decode_actor_error(std::span<const uint8_t> bytes, const DecodeLimits& limits = {});
TokenBatch decode_token_batch(std::span<const uint8_t> bytes, const DecodeLimits& limits = {});
TrainStep decode_train_step(std::span<const uint8_t> bytes, const DecodeLimits& limits = {});
TrainStepResult decode_train_step_result(std::span<const uint8_t> bytes, const DecodeLimits& limits = {});
CheckpointManifest decode_checkpoint_manifest(std::span<const uint8_t> bytes, const DecodeLimits& limits = {});
GenerationRequest decode_generation_request(std::span<const uint8_t> bytes, const DecodeLimits& limits = {});
Rollout decode_rollout(std::span<const uint8_t> bytes, const DecodeLimits& limits = {});
Comparison decode_comparison(std::span<const uint8_t> bytes, const DecodeLimits& limits = {});
Rating decode_rating(std::span<const uint8_t> bytes, const DecodeLimits& limits = {});
Correction decode_correction(std::span<const uint8_t> bytes, const DecodeLimits& limits = {});
ReplayRecord decode_replay_record(std::span<const uint8_t> bytes, const DecodeLimits& limits = {});

}  // namespace moerl::msg
