// PairToJudge (schemas/feedback.capnp): two responses to one prompt queued for people to judge, with its
// validating codec (same rules as runtime/messages/codec.hpp: any malformation throws moerl::Error naming
// the field, never another exception type), and the JSONL export of stored feedback.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "runtime/messages/codec.hpp"
#include "runtime/messages/types.hpp"

namespace moerl::store {

struct PairToJudge {
  uint32_t schema_version = msg::kFeedbackSchemaVersion;
  uint64_t pair_id = 0;  // > 0
  msg::Utterance prompt, first, second;
  msg::PolicyVersion first_policy, second_policy;
  int64_t created_ns = 0;  // > 0
  bool operator==(const PairToJudge&) const = default;
};

std::vector<uint8_t> encode(const PairToJudge& x);
PairToJudge decode_pair(std::span<const uint8_t> bytes, const msg::DecodeLimits& limits = {});

// One JSON line (no newline) in the preference format HF TRL's reward and DPO trainers read:
// {"prompt", "chosen", "rejected"} plus our provenance fields (annotator, timestamp_ns, policies).
// A tie has no chosen response: it is exported with "tie": true and chosen/rejected in shown order.
std::string comparison_jsonl(const msg::Comparison& c);
// {"prompt", "completion", "score", "scale_min", "scale_max", "annotator", "timestamp_ns", "policy_version"}.
std::string rating_jsonl(const msg::Rating& r);
// {"prompt", "completion" (the rewrite), "original", "annotator", "timestamp_ns", "policy_version"}: SFT data.
std::string correction_jsonl(const msg::Correction& c);

}  // namespace moerl::store
