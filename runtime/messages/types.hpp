// Plain C++ mirrors of the control-plane messages in schemas/*.capnp. The rest of moerl builds and reads
// these; only runtime/messages/codec.cpp touches Cap'n Proto builders and readers. Field meanings, units
// and allowed ranges are documented once, in the schema files; comments here only map names.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "runtime/tensor.hpp"

namespace moerl::msg {

// schemas/common.capnp

struct StepId {
  std::string run;
  uint64_t step = 0;
  bool operator==(const StepId&) const = default;
};

struct PolicyVersion {
  uint64_t version = 0;
  uint64_t step = 0;
  bool operator==(const PolicyVersion&) const = default;
};

enum class Transport : uint8_t { Inline, Local, Nccl, Gloo };
enum class Collective : uint8_t { None, Send, Broadcast, AllReduce, AllGather, ReduceScatter, AllToAll };

struct TensorRef {
  std::string name;
  DType dtype = DType::F32;
  Shape shape;  // row-major dims, each >= 0
  Device device = Device::CPU;
  uint32_t device_index = 0;
  uint32_t rank = 0;
  Transport transport = Transport::Local;
  Collective collective = Collective::None;
  std::string group;
  uint64_t byte_size = 0;            // numel(shape) * dtype_size(dtype)
  std::vector<uint8_t> inline_data;  // byte_size bytes when transport == Inline, else empty
  bool operator==(const TensorRef&) const = default;
};

enum class ErrorCode : uint8_t { InvalidRequest, NotFound, Unavailable, Internal, StaleVersion };

struct ActorError {
  ErrorCode code = ErrorCode::Internal;
  std::string message;
  std::string actor;
  StepId step;
  bool operator==(const ActorError&) const = default;
};

// schemas/training.capnp

// Label of a position that takes no loss (kIgnoreLabel of runtime/model/model.hpp).
constexpr int32_t kNoLossLabel = -100;

struct TokenBatch {
  StepId step;
  uint32_t batch = 0, seq = 0;
  std::vector<int32_t> ids;     // [batch, seq]
  std::vector<int32_t> labels;  // [batch, seq]; kNoLossLabel where no loss is taken
  bool operator==(const TokenBatch&) const = default;
};

struct TrainStep {
  StepId step;
  std::vector<TokenBatch> batches;  // micro-batches accumulated into one update
  double learning_rate = 0;
  bool operator==(const TrainStep&) const = default;
};

struct ExpertLoad {
  uint32_t layer = 0;
  std::vector<uint32_t> tokens_per_expert;  // [n_routed_experts]
  bool operator==(const ExpertLoad&) const = default;
};

struct TrainStepResult {
  StepId step;
  double loss = 0, mtp_loss = 0, balance_loss = 0;  // nats
  double grad_norm = 0;
  double learning_rate = 0;
  uint64_t tokens = 0;
  bool skipped = false;
  std::vector<ExpertLoad> expert_load;  // one per MoE layer, ascending layer
  bool operator==(const TrainStepResult&) const = default;
};

enum class ChecksumKind : uint8_t { Sha256, Crc32c };

struct FileEntry {
  std::string path;  // relative to the checkpoint folder
  uint64_t bytes = 0;
  ChecksumKind checksum_kind = ChecksumKind::Sha256;
  std::vector<uint8_t> checksum;  // 32 bytes (sha256) or 4 (crc32c)
  bool operator==(const FileEntry&) const = default;
};

struct CheckpointManifest {
  std::string folder;
  StepId step;
  std::vector<FileEntry> files;
  bool operator==(const CheckpointManifest&) const = default;
};

// schemas/rollout.capnp

struct SamplingParams {
  float temperature = 1.0f;  // 0 = greedy
  float top_p = 1.0f;        // 1 = off
  uint32_t top_k = 0;        // 0 = off
  uint32_t max_new_tokens = 1;
  std::vector<int32_t> stop_ids;
  uint64_t seed = 0;
  bool operator==(const SamplingParams&) const = default;
};

struct GenerationRequest {
  uint64_t request_id = 0;
  std::vector<int32_t> prompt_ids;
  SamplingParams sampling;
  PolicyVersion policy_version;
  uint32_t samples = 1;  // responses to generate (GRPO group size G)
  bool operator==(const GenerationRequest&) const = default;
};

enum class FinishReason : uint8_t { Stop, Length, Aborted };

struct Rollout {
  uint64_t request_id = 0;
  uint32_t sample_index = 0;
  std::vector<int32_t> prompt_ids;
  std::vector<int32_t> response_ids;
  std::vector<float> log_probs;  // [response_ids.size()], natural log, <= 0
  PolicyVersion policy_version;
  FinishReason finish_reason = FinishReason::Stop;
  bool operator==(const Rollout&) const = default;
};

// schemas/feedback.capnp (stored records)

// The schemaVersion this code writes and the only one it reads (feedback.capnp currentSchemaVersion).
constexpr uint32_t kFeedbackSchemaVersion = 1;

struct Utterance {
  std::string text;
  std::vector<int32_t> ids;  // empty when not tokenized
  bool operator==(const Utterance&) const = default;
};

enum class Choice : uint8_t { FirstChosen, SecondChosen, Tie };

struct Comparison {
  uint32_t schema_version = kFeedbackSchemaVersion;
  Utterance prompt, first, second;
  Choice choice = Choice::Tie;
  std::string annotator;
  int64_t timestamp_ns = 0;  // Unix epoch, UTC
  PolicyVersion first_policy, second_policy;
  bool operator==(const Comparison&) const = default;
};

struct Rating {
  uint32_t schema_version = kFeedbackSchemaVersion;
  Utterance prompt, response;
  float score = 0, scale_min = 1, scale_max = 7;
  std::string annotator;
  int64_t timestamp_ns = 0;
  PolicyVersion policy;
  bool operator==(const Rating&) const = default;
};

struct Correction {
  uint32_t schema_version = kFeedbackSchemaVersion;
  Utterance prompt, original;
  std::string corrected;
  std::string annotator;
  int64_t timestamp_ns = 0;
  PolicyVersion policy;
  bool operator==(const Correction&) const = default;
};

struct ReplayRecord {
  uint32_t schema_version = kFeedbackSchemaVersion;
  Rollout rollout;
  float score = 0;
  std::vector<float> rewards;     // [response length] or empty
  std::vector<float> advantages;  // [response length]
  uint64_t group_id = 0;
  StepId step;
  bool operator==(const ReplayRecord&) const = default;
};

}  // namespace moerl::msg
