// Plain mirrors of schemas/control.capnp (the driver's commands to data loaders and stage trainers, a reward
// model's score) with encode/decode, by the rules of codec.hpp: decode_<kind>() checks every documented rule
// and throws moerl::Error naming the kind and field ("EvalRequest.batches[1]: TokenBatch.ids[3]: ..."); no
// input crashes the reader; the traversal limit of each kind is derived from DecodeLimits. Field meanings
// are documented once, in the schema.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "runtime/messages/codec.hpp"
#include "runtime/messages/types.hpp"

namespace moerl::msg {

struct LoaderPosition {
  uint64_t seed = 0;
  int64_t epoch = 0, cursor = 0;  // >= 0
  StepId step;                    // step 0: no batch served yet
  bool operator==(const LoaderPosition&) const = default;
};

struct DatasetInfo {
  std::string tokenizer_file;
  uint32_t vocab_size = 0;
  int32_t bos_id = 0, eos_id = 0, pad_id = 0;  // each in [0, vocab_size)
  uint64_t train_tokens = 0, validation_tokens = 0;
  bool operator==(const DatasetInfo&) const = default;
};

struct StageData {
  uint32_t stage = 0;
  LoaderPosition position;
  std::vector<TokenBatch> validation;  // may be empty
  bool has_bigram = false;
  double bigram_validation_loss = 0;   // nats, when has_bigram
  bool operator==(const StageData&) const = default;
};

struct EvalRequest {
  StepId step;
  std::vector<TokenBatch> batches;  // at least one
  bool operator==(const EvalRequest&) const = default;
};

struct EvalResult {
  StepId step;
  double loss = 0;  // nats
  uint64_t tokens = 0;
  bool operator==(const EvalResult&) const = default;
};

struct CheckpointRequest {
  std::string folder;
  StepId step;
  std::string trainer_state;  // JSON object
  bool operator==(const CheckpointRequest&) const = default;
};

struct RewardScore {
  uint64_t request_id = 0;
  uint32_t sample_index = 0;
  float score = 0;
  std::string scorer;
  bool operator==(const RewardScore&) const = default;
};

// The schema struct names, carried beside the bytes in an actor message.
inline constexpr const char* kLoaderPositionKind = "LoaderPosition";
inline constexpr const char* kDatasetInfoKind = "DatasetInfo";
inline constexpr const char* kStageDataKind = "StageData";
inline constexpr const char* kEvalRequestKind = "EvalRequest";
inline constexpr const char* kEvalResultKind = "EvalResult";
inline constexpr const char* kCheckpointRequestKind = "CheckpointRequest";
inline constexpr const char* kRewardScoreKind = "RewardScore";

std::vector<uint8_t> encode(const LoaderPosition& x);
std::vector<uint8_t> encode(const DatasetInfo& x);
std::vector<uint8_t> encode(const StageData& x);
std::vector<uint8_t> encode(const EvalRequest& x);
std::vector<uint8_t> encode(const EvalResult& x);
std::vector<uint8_t> encode(const CheckpointRequest& x);
std::vector<uint8_t> encode(const RewardScore& x);

// StageData and EvalRequest hold at most max_micro_batches batches, sharing max_batch_tokens.
LoaderPosition decode_loader_position(std::span<const uint8_t> bytes, const DecodeLimits& limits = {});
DatasetInfo decode_dataset_info(std::span<const uint8_t> bytes, const DecodeLimits& limits = {});
StageData decode_stage_data(std::span<const uint8_t> bytes, const DecodeLimits& limits = {});
EvalRequest decode_eval_request(std::span<const uint8_t> bytes, const DecodeLimits& limits = {});
EvalResult decode_eval_result(std::span<const uint8_t> bytes, const DecodeLimits& limits = {});
CheckpointRequest decode_checkpoint_request(std::span<const uint8_t> bytes, const DecodeLimits& limits = {});
RewardScore decode_reward_score(std::span<const uint8_t> bytes, const DecodeLimits& limits = {});

}  // namespace moerl::msg
