// encode(): plain structs (types.hpp) -> one unpacked Cap'n Proto message. The builder's first segment is
// sized from the struct, so a message is normally one segment and written with a single copy.
#include <capnp/any.h>
#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/io.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <type_traits>

#include "runtime/error.hpp"
#include "runtime/messages/codec.hpp"
#include "runtime/messages/flat.hpp"
#include "runtime/messages/wire.hpp"

namespace moerl::msg {
namespace {

using wire_enums::to_wire;

// Words of the message for `x`, rounded generously: a first-segment size hint, not a bound.
constexpr size_t kStructWords = 16;
size_t words_of(size_t bytes) { return bytes / 8 + 1; }

// A freshly initialised primitive list is contiguous little-endian elements of T's size in the builder's
// (mutable) segment, so the values go in with one memcpy; the address comes from a reader view of it.
template <class T, class ListBuilder>
void put_list(ListBuilder list, const std::vector<T>& values) {
  static_assert(std::endian::native == std::endian::little && std::is_arithmetic_v<T>);
  if (values.empty()) return;
  const auto raw = capnp::AnyList::Reader(list.asReader()).getRawBytes();
  if (raw.size() == values.size() * sizeof(T)) {
    std::memcpy(const_cast<kj::byte*>(raw.begin()), values.data(), raw.size());
  } else {
    for (size_t i = 0; i < values.size(); ++i) list.set(static_cast<unsigned>(i), values[i]);
  }
}

kj::ArrayPtr<const kj::byte> bytes_of(const std::vector<uint8_t>& v) { return kj::arrayPtr(v.data(), v.size()); }
capnp::Text::Reader text_of(const std::string& s) { return capnp::Text::Reader(s.data(), s.size()); }

void fill(wire::StepId::Builder b, const StepId& x) {
  b.setRun(text_of(x.run));
  b.setStep(x.step);
}

void fill(wire::PolicyVersion::Builder b, const PolicyVersion& x) {
  b.setVersion(x.version);
  b.setStep(x.step);
}

void fill(wire::TensorRef::Builder b, const TensorRef& x) {
  b.setName(text_of(x.name));
  b.setDtype(to_wire<wire::DType>(x.dtype));
  auto shape = b.initShape(static_cast<unsigned>(x.shape.size()));
  put_list(shape, x.shape);
  b.setDevice(to_wire<wire::DeviceKind>(x.device));
  b.setDeviceIndex(x.device_index);
  b.setRank(x.rank);
  b.setTransport(to_wire<wire::Transport>(x.transport));
  b.setCollective(to_wire<wire::Collective>(x.collective));
  b.setGroup(text_of(x.group));
  b.setByteSize(x.byte_size);
  if (!x.inline_data.empty()) b.setInlineData(bytes_of(x.inline_data));
}

void fill(wire::ActorError::Builder b, const ActorError& x) {
  b.setCode(to_wire<wire::ErrorCode>(x.code));
  b.setMessage(text_of(x.message));
  b.setActor(text_of(x.actor));
  fill(b.initStep(), x.step);
}

void fill(wire::TokenBatch::Builder b, const TokenBatch& x) {
  fill(b.initStep(), x.step);
  b.setBatch(x.batch);
  b.setSeq(x.seq);
  put_list(b.initIds(static_cast<unsigned>(x.ids.size())), x.ids);
  put_list(b.initLabels(static_cast<unsigned>(x.labels.size())), x.labels);
}

void fill(wire::TrainStep::Builder b, const TrainStep& x) {
  fill(b.initStep(), x.step);
  auto batches = b.initBatches(static_cast<unsigned>(x.batches.size()));
  for (size_t i = 0; i < x.batches.size(); ++i) fill(batches[static_cast<unsigned>(i)], x.batches[i]);
  b.setLearningRate(x.learning_rate);
}

void fill(wire::TrainStepResult::Builder b, const TrainStepResult& x) {
  fill(b.initStep(), x.step);
  b.setLoss(x.loss);
  b.setMtpLoss(x.mtp_loss);
  b.setBalanceLoss(x.balance_loss);
  b.setGradNorm(x.grad_norm);
  b.setLearningRate(x.learning_rate);
  b.setTokens(x.tokens);
  b.setSkipped(x.skipped);
  auto load = b.initExpertLoad(static_cast<unsigned>(x.expert_load.size()));
  for (size_t i = 0; i < x.expert_load.size(); ++i) {
    auto e = load[static_cast<unsigned>(i)];
    e.setLayer(x.expert_load[i].layer);
    put_list(e.initTokensPerExpert(static_cast<unsigned>(x.expert_load[i].tokens_per_expert.size())),
             x.expert_load[i].tokens_per_expert);
  }
}

void fill(wire::CheckpointManifest::Builder b, const CheckpointManifest& x) {
  b.setFolder(text_of(x.folder));
  fill(b.initStep(), x.step);
  auto files = b.initFiles(static_cast<unsigned>(x.files.size()));
  for (size_t i = 0; i < x.files.size(); ++i) {
    auto f = files[static_cast<unsigned>(i)];
    f.setPath(text_of(x.files[i].path));
    f.setBytes(x.files[i].bytes);
    f.setChecksumKind(to_wire<wire::ChecksumKind>(x.files[i].checksum_kind));
    f.setChecksum(bytes_of(x.files[i].checksum));
  }
}

void fill(wire::SamplingParams::Builder b, const SamplingParams& x) {
  b.setTemperature(x.temperature);
  b.setTopP(x.top_p);
  b.setTopK(x.top_k);
  b.setMaxNewTokens(x.max_new_tokens);
  put_list(b.initStopIds(static_cast<unsigned>(x.stop_ids.size())), x.stop_ids);
  b.setSeed(x.seed);
}

void fill(wire::GenerationRequest::Builder b, const GenerationRequest& x) {
  b.setRequestId(x.request_id);
  put_list(b.initPromptIds(static_cast<unsigned>(x.prompt_ids.size())), x.prompt_ids);
  fill(b.initSampling(), x.sampling);
  fill(b.initPolicyVersion(), x.policy_version);
  b.setSamples(x.samples);
}

void fill(wire::Rollout::Builder b, const Rollout& x) {
  b.setRequestId(x.request_id);
  b.setSampleIndex(x.sample_index);
  put_list(b.initPromptIds(static_cast<unsigned>(x.prompt_ids.size())), x.prompt_ids);
  put_list(b.initResponseIds(static_cast<unsigned>(x.response_ids.size())), x.response_ids);
  put_list(b.initLogProbs(static_cast<unsigned>(x.log_probs.size())), x.log_probs);
  fill(b.initPolicyVersion(), x.policy_version);
  b.setFinishReason(to_wire<wire::FinishReason>(x.finish_reason));
}

void fill(wire::Utterance::Builder b, const Utterance& x) {
  b.setText(text_of(x.text));
  put_list(b.initIds(static_cast<unsigned>(x.ids.size())), x.ids);
}

void fill(wire::Comparison::Builder b, const Comparison& x) {
  b.setSchemaVersion(x.schema_version);
  fill(b.initPrompt(), x.prompt);
  fill(b.initFirst(), x.first);
  fill(b.initSecond(), x.second);
  b.setChoice(to_wire<wire::Choice>(x.choice));
  b.setAnnotator(text_of(x.annotator));
  b.setTimestampNs(x.timestamp_ns);
  fill(b.initFirstPolicy(), x.first_policy);
  fill(b.initSecondPolicy(), x.second_policy);
}

void fill(wire::Rating::Builder b, const Rating& x) {
  b.setSchemaVersion(x.schema_version);
  fill(b.initPrompt(), x.prompt);
  fill(b.initResponse(), x.response);
  b.setScore(x.score);
  b.setScaleMin(x.scale_min);
  b.setScaleMax(x.scale_max);
  b.setAnnotator(text_of(x.annotator));
  b.setTimestampNs(x.timestamp_ns);
  fill(b.initPolicy(), x.policy);
}

void fill(wire::Correction::Builder b, const Correction& x) {
  b.setSchemaVersion(x.schema_version);
  fill(b.initPrompt(), x.prompt);
  fill(b.initOriginal(), x.original);
  b.setCorrected(text_of(x.corrected));
  b.setAnnotator(text_of(x.annotator));
  b.setTimestampNs(x.timestamp_ns);
  fill(b.initPolicy(), x.policy);
}

void fill(wire::ReplayRecord::Builder b, const ReplayRecord& x) {
  b.setSchemaVersion(x.schema_version);
  fill(b.initRollout(), x.rollout);
  b.setScore(x.score);
  put_list(b.initRewards(static_cast<unsigned>(x.rewards.size())), x.rewards);
  put_list(b.initAdvantages(static_cast<unsigned>(x.advantages.size())), x.advantages);
  b.setGroupId(x.group_id);
  fill(b.initStep(), x.step);
}

// Rough payload size of each struct in bytes, for the first-segment hint.
size_t payload(const std::string& s) { return s.size(); }
template <class T>
size_t payload(const std::vector<T>& v) {
  return v.size() * sizeof(T);
}
size_t payload(const Utterance& u) { return payload(u.text) + payload(u.ids); }
size_t payload(const Rollout& r) { return payload(r.prompt_ids) + payload(r.response_ids) + payload(r.log_probs); }
size_t payload(const TokenBatch& b) { return payload(b.step.run) + payload(b.ids) + payload(b.labels); }

// Cap'n Proto refuses what it cannot represent (a list of 2^29 or more elements, a segment over 4 GiB)
// with kj::Exception; the caller gets moerl::Error naming the kind.
template <class Wire, class Plain>
std::vector<uint8_t> build(MessageKind kind, const Plain& x, size_t payload_bytes) {
  try {
    const size_t hint = std::min<size_t>(kStructWords * 8 + words_of(payload_bytes), size_t{1} << 28);
    capnp::MallocMessageBuilder message(static_cast<unsigned>(hint));
    fill(message.initRoot<Wire>(), x);
    return flat_bytes(message);
  } catch (const kj::Exception& e) {
    throw Error(std::string(kind_name(kind)) + ": cannot encode (" + e.getDescription().cStr() + ")");
  }
}

}  // namespace

std::vector<uint8_t> encode(const TensorRef& x) {
  const size_t bytes = x.name.size() + x.group.size() + x.inline_data.size() + 8 * x.shape.size();
  return build<wire::TensorRef>(MessageKind::TensorRef, x, bytes);
}
std::vector<uint8_t> encode(const ActorError& x) {
  const size_t bytes = x.message.size() + x.actor.size() + x.step.run.size();
  return build<wire::ActorError>(MessageKind::ActorError, x, bytes);
}
std::vector<uint8_t> encode(const TokenBatch& x) {
  return build<wire::TokenBatch>(MessageKind::TokenBatch, x, payload(x));
}
std::vector<uint8_t> encode(const TrainStep& x) {
  size_t bytes = payload(x.step.run);
  for (const auto& b : x.batches) bytes += payload(b) + kStructWords * 16;
  return build<wire::TrainStep>(MessageKind::TrainStep, x, bytes);
}
std::vector<uint8_t> encode(const TrainStepResult& x) {
  size_t bytes = payload(x.step.run);
  for (const auto& e : x.expert_load) bytes += payload(e.tokens_per_expert) + kStructWords * 8;
  return build<wire::TrainStepResult>(MessageKind::TrainStepResult, x, bytes);
}
std::vector<uint8_t> encode(const CheckpointManifest& x) {
  size_t bytes = payload(x.folder) + payload(x.step.run);
  for (const auto& f : x.files) bytes += payload(f.path) + payload(f.checksum) + kStructWords * 8;
  return build<wire::CheckpointManifest>(MessageKind::CheckpointManifest, x, bytes);
}
std::vector<uint8_t> encode(const GenerationRequest& x) {
  const size_t bytes = payload(x.prompt_ids) + payload(x.sampling.stop_ids);
  return build<wire::GenerationRequest>(MessageKind::GenerationRequest, x, bytes);
}
std::vector<uint8_t> encode(const Rollout& x) { return build<wire::Rollout>(MessageKind::Rollout, x, payload(x)); }
std::vector<uint8_t> encode(const Comparison& x) {
  const size_t bytes = payload(x.prompt) + payload(x.first) + payload(x.second) + payload(x.annotator);
  return build<wire::Comparison>(MessageKind::Comparison, x, bytes);
}
std::vector<uint8_t> encode(const Rating& x) {
  const size_t bytes = payload(x.prompt) + payload(x.response) + payload(x.annotator);
  return build<wire::Rating>(MessageKind::Rating, x, bytes);
}
std::vector<uint8_t> encode(const Correction& x) {
  const size_t bytes = payload(x.prompt) + payload(x.original) + payload(x.corrected) + payload(x.annotator);
  return build<wire::Correction>(MessageKind::Correction, x, bytes);
}
std::vector<uint8_t> encode(const ReplayRecord& x) {
  const size_t bytes = payload(x.rollout) + payload(x.rewards) + payload(x.advantages) + payload(x.step.run);
  return build<wire::ReplayRecord>(MessageKind::ReplayRecord, x, bytes);
}

}  // namespace moerl::msg
