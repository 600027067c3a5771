// decode_<kind>(): bytes -> plain struct, checking everything the schemas promise. Each getter of a
// reader is called once: Cap'n Proto charges the traversal limit on every call.
#include <capnp/any.h>
#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/exception.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <set>
#include <string>

#include "runtime/error.hpp"
#include "runtime/messages/codec.hpp"
#include "runtime/messages/wire.hpp"

namespace moerl::msg {
namespace {

namespace we = wire_enums;

// The field being read, for error messages ("TrainStep.batches[2].ids"). Built only when a check fails.
struct Path {
  const char* name;
  const Path* parent = nullptr;
  int64_t index = -1;  // element of a list field

  Path operator/(const char* child) const { return Path{child, this}; }
  Path at(size_t i) const { return Path{name, parent, static_cast<int64_t>(i)}; }
  std::string str() const {
    std::string s = parent ? parent->str() : std::string();
    if (parent) s += '.';
    s += name;
    if (index >= 0) {
      s += '[';
      s += std::to_string(index);
      s += ']';
    }
    return s;
  }
};

[[noreturn]] void fail(const Path& p, const std::string& what) { throw Error(p.str() + ": " + what); }
std::string num(uint64_t v) { return std::to_string(v); }

std::string read_text(capnp::Text::Reader t, uint64_t max_bytes, const Path& p, bool nonempty) {
  if (t.size() > max_bytes) fail(p, num(t.size()) + " bytes, at most " + num(max_bytes) + " allowed");
  if (nonempty && t.size() == 0) fail(p, "empty, expected a non-empty text");
  return std::string(t.cStr(), t.size());
}

std::vector<uint8_t> read_data(capnp::Data::Reader d, uint64_t max_bytes, const Path& p) {
  if (d.size() > max_bytes) fail(p, num(d.size()) + " bytes, at most " + num(max_bytes) + " allowed");
  return std::vector<uint8_t>(d.begin(), d.end());
}

template <class T>
constexpr capnp::ElementSize element_size() {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8);
  return sizeof(T) == 4 ? capnp::ElementSize::FOUR_BYTES : capnp::ElementSize::EIGHT_BYTES;
}

template <class T>
std::vector<T> read_list(typename capnp::List<T>::Reader l, uint64_t max_entries, const Path& p) {
  if (l.size() > max_entries) fail(p, num(l.size()) + " entries, at most " + num(max_entries) + " allowed");
  std::vector<T> out(l.size());
  // Cap'n Proto is little-endian, like every host we build for: a list stored with the element size of T
  // is T's bytes as they are. A list stored otherwise (a struct list read as a primitive one, legal for
  // schema evolution) goes element by element.
  static_assert(std::endian::native == std::endian::little);
  const capnp::AnyList::Reader any(l);
  const auto raw = any.getRawBytes();
  if (any.getElementSize() == element_size<T>() && raw.size() == out.size() * sizeof(T)) {
    if (!out.empty()) std::memcpy(out.data(), raw.begin(), raw.size());
  } else {
    for (unsigned i = 0; i < l.size(); ++i) out[i] = l[i];
  }
  return out;
}

// Token ids in [0, vocab) (only >= 0 when the vocabulary is unknown); labels may also be kNoLossLabel.
// A branch-free scan first (it vectorizes: this is most of a TokenBatch's decode time), then a search for
// the first offender to name it.
void check_tokens(const std::vector<int32_t>& ids, const DecodeLimits& limits, const Path& p, bool labels = false) {
  const uint32_t bound =
      limits.vocab > 0 && limits.vocab < (int64_t{1} << 31) ? static_cast<uint32_t>(limits.vocab) : uint32_t{1} << 31;
  const auto no_loss = static_cast<uint32_t>(kNoLossLabel);
  uint32_t bad = 0;
  const uint32_t* u = reinterpret_cast<const uint32_t*>(ids.data());
  const size_t n = ids.size();
  if (labels) {
    for (size_t i = 0; i < n; ++i) bad |= static_cast<uint32_t>(u[i] >= bound) & static_cast<uint32_t>(u[i] != no_loss);
  } else {
    for (size_t i = 0; i < n; ++i) bad |= static_cast<uint32_t>(u[i] >= bound);
  }
  if (!bad) return;
  for (size_t i = 0; i < ids.size(); ++i) {
    const auto v = static_cast<uint32_t>(ids[i]);
    if (v < bound || (labels && v == no_loss)) continue;
    std::string range = limits.vocab > 0 ? "[0, " + std::to_string(limits.vocab) + ")" : "[0, vocab)";
    fail(p.at(i), std::to_string(ids[i]) + " is not a token id in " + range + (labels ? " nor -100 (no loss)" : ""));
  }
}

template <class F>
void check_finite(F v, const Path& p) {
  if (!std::isfinite(v)) fail(p, std::to_string(v) + ", expected a finite number");
}
template <class F>
void check_finite_all(const std::vector<F>& v, const Path& p) {
  for (size_t i = 0; i < v.size(); ++i)
    if (!std::isfinite(v[i])) fail(p.at(i), std::to_string(v[i]) + ", expected a finite number");
}

template <class Plain, class Wire>
Plain read_enum(Wire w, uint16_t count, const Path& p) {
  const auto raw = static_cast<uint16_t>(w);
  if (raw >= count) fail(p, "unknown enum value " + num(raw) + " (this build knows 0.." + num(count - 1u) + ")");
  return static_cast<Plain>(raw);
}

void check_schema_version(uint32_t v, const Path& p) {
  if (v != kFeedbackSchemaVersion)
    fail(p / "schemaVersion",
         "version " + num(v) + " is not known (this build reads version " + num(kFeedbackSchemaVersion) + ")");
}

StepId read_step_id(wire::StepId::Reader r, const DecodeLimits& l, const Path& p) {
  return StepId{read_text(r.getRun(), l.max_name_bytes, p / "run", false), r.getStep()};
}
PolicyVersion read_policy(wire::PolicyVersion::Reader r) { return PolicyVersion{r.getVersion(), r.getStep()}; }

TensorRef read_tensor_ref(wire::TensorRef::Reader r, const DecodeLimits& l, const Path& p) {
  TensorRef x;
  x.name = read_text(r.getName(), l.max_name_bytes, p / "name", true);
  x.dtype = read_enum<DType>(r.getDtype(), we::kDTypes, p / "dtype");
  x.shape = read_list<int64_t>(r.getShape(), l.max_dims, p / "shape");
  x.device = read_enum<Device>(r.getDevice(), we::kDevices, p / "device");
  x.device_index = r.getDeviceIndex();
  x.rank = r.getRank();
  x.transport = read_enum<Transport>(r.getTransport(), we::kTransports, p / "transport");
  x.collective = read_enum<Collective>(r.getCollective(), we::kCollectives, p / "collective");
  x.group = read_text(r.getGroup(), l.max_name_bytes, p / "group", false);
  x.byte_size = r.getByteSize();
  x.inline_data = read_data(r.getInlineData(), l.max_inline_bytes, p / "inlineData");

  uint64_t bytes = dtype_size(x.dtype);
  for (size_t i = 0; i < x.shape.size(); ++i) {
    if (x.shape[i] < 0) fail((p / "shape").at(i), std::to_string(x.shape[i]) + ", expected a size >= 0");
    if (__builtin_mul_overflow(bytes, static_cast<uint64_t>(x.shape[i]), &bytes))
      fail(p / "shape", shape_string(x.shape) + " overflows 64-bit byte counts");
  }
  if (x.byte_size != bytes)
    fail(p / "byteSize", num(x.byte_size) + ", expected " + num(bytes) + " for " + std::string(dtype_name(x.dtype)) +
                             " " + shape_string(x.shape));
  if (x.device == Device::CPU && x.device_index != 0)
    fail(p / "deviceIndex", num(x.device_index) + ", expected 0 for a CPU tensor");
  const bool moved = x.transport == Transport::Nccl || x.transport == Transport::Gloo;
  if (x.transport == Transport::Inline) {
    if (x.inline_data.size() != x.byte_size)
      fail(p / "inlineData", num(x.inline_data.size()) + " bytes, expected byteSize = " + num(x.byte_size));
  } else if (!x.inline_data.empty()) {
    fail(p / "inlineData", num(x.inline_data.size()) + " bytes, expected none unless transport = inline");
  }
  if (moved == (x.collective == Collective::None))
    fail(p / "collective", moved ? "none, expected a collective for an nccl or gloo transport"
                                 : "expected none for an inline or local transport");
  if (moved && x.group.empty()) fail(p / "group", "empty, expected the process group of the collective");
  if (x.transport == Transport::Nccl && x.device != Device::CUDA)
    fail(p / "device", "cpu, expected cuda for an nccl transport");
  return x;
}

ActorError read_actor_error(wire::ActorError::Reader r, const DecodeLimits& l, const Path& p) {
  ActorError x;
  x.code = read_enum<ErrorCode>(r.getCode(), we::kErrorCodes, p / "code");
  x.message = read_text(r.getMessage(), l.max_text_bytes, p / "message", true);
  x.actor = read_text(r.getActor(), l.max_name_bytes, p / "actor", false);
  x.step = read_step_id(r.getStep(), l, p / "step");
  return x;
}

// `tokens_left`: what remains of max_batch_tokens (shared by a TrainStep's micro-batches).
TokenBatch read_batch(wire::TokenBatch::Reader r, const DecodeLimits& l, const Path& p, uint64_t& tokens_left) {
  TokenBatch x;
  x.step = read_step_id(r.getStep(), l, p / "step");
  x.batch = r.getBatch();
  x.seq = r.getSeq();
  if (x.batch == 0) fail(p / "batch", "0, expected at least one sequence");
  if (x.seq == 0) fail(p / "seq", "0, expected at least one token per sequence");
  const uint64_t n = uint64_t{x.batch} * x.seq;
  if (n > tokens_left)
    fail(p, "batch * seq = " + num(n) + " tokens, more than the " + num(tokens_left) + " allowed (max_batch_tokens)");
  tokens_left -= n;
  auto ids = r.getIds();
  if (ids.size() != n) fail(p / "ids", num(ids.size()) + " entries, expected batch * seq = " + num(n));
  x.ids = read_list<int32_t>(ids, n, p / "ids");
  check_tokens(x.ids, l, p / "ids");
  auto labels = r.getLabels();
  if (labels.size() != n) fail(p / "labels", num(labels.size()) + " entries, expected batch * seq = " + num(n));
  x.labels = read_list<int32_t>(labels, n, p / "labels");
  check_tokens(x.labels, l, p / "labels", true);
  return x;
}

void check_step(const StepId& s, const Path& p) {
  if (s.run.empty()) fail(p / "run", "empty, expected the run's name");
  if (s.step == 0) fail(p / "step", "0, expected a step >= 1");
}

TrainStep read_train_step(wire::TrainStep::Reader r, const DecodeLimits& l, const Path& p) {
  TrainStep x;
  x.step = read_step_id(r.getStep(), l, p / "step");
  check_step(x.step, p / "step");
  auto batches = r.getBatches();
  const Path bp = p / "batches";
  if (batches.size() == 0) fail(bp, "empty, expected at least one micro-batch");
  if (batches.size() > l.max_micro_batches)
    fail(bp, num(batches.size()) + " micro-batches, at most " + num(l.max_micro_batches) + " allowed");
  uint64_t tokens_left = l.max_batch_tokens;
  for (unsigned i = 0; i < batches.size(); ++i) {
    const Path bi = bp.at(i);
    x.batches.push_back(read_batch(batches[i], l, bi, tokens_left));
    if (!(x.batches.back().step == x.step))
      fail(bi / "step", x.batches.back().step.run + "/" + num(x.batches.back().step.step) +
                            ", expected the command's step " + x.step.run + "/" + num(x.step.step));
  }
  x.learning_rate = r.getLearningRate();
  check_finite(x.learning_rate, p / "learningRate");
  if (x.learning_rate < 0) fail(p / "learningRate", std::to_string(x.learning_rate) + ", expected >= 0");
  return x;
}

TrainStepResult read_train_step_result(wire::TrainStepResult::Reader r, const DecodeLimits& l, const Path& p) {
  TrainStepResult x;
  x.step = read_step_id(r.getStep(), l, p / "step");
  check_step(x.step, p / "step");
  x.loss = r.getLoss();
  x.mtp_loss = r.getMtpLoss();
  x.balance_loss = r.getBalanceLoss();
  x.grad_norm = r.getGradNorm();
  x.learning_rate = r.getLearningRate();
  x.tokens = r.getTokens();
  x.skipped = r.getSkipped();
  if (!x.skipped) {
    const std::pair<double, const char*> measured[] = {
        {x.loss, "loss"}, {x.mtp_loss, "mtpLoss"}, {x.balance_loss, "balanceLoss"}, {x.grad_norm, "gradNorm"}};
    for (const auto& [v, name] : measured) {
      check_finite(v, p / name);
      if (v < 0) fail(p / name, std::to_string(v) + ", expected >= 0");
    }
  }
  check_finite(x.learning_rate, p / "learningRate");
  if (x.learning_rate < 0) fail(p / "learningRate", std::to_string(x.learning_rate) + ", expected >= 0");
  auto load = r.getExpertLoad();
  const Path lp = p / "expertLoad";
  if (load.size() > l.max_layers) fail(lp, num(load.size()) + " layers, at most " + num(l.max_layers) + " allowed");
  for (unsigned i = 0; i < load.size(); ++i) {
    const Path li = lp.at(i);
    ExpertLoad e;
    e.layer = load[i].getLayer();
    e.tokens_per_expert = read_list<uint32_t>(load[i].getTokensPerExpert(), l.max_experts, li / "tokensPerExpert");
    if (e.tokens_per_expert.empty()) fail(li / "tokensPerExpert", "empty, expected one count per routed expert");
    if (i > 0 && e.layer <= x.expert_load.back().layer)
      fail(li / "layer",
           num(e.layer) + ", expected layers in ascending order (previous " + num(x.expert_load.back().layer) + ")");
    if (i > 0 && e.tokens_per_expert.size() != x.expert_load[0].tokens_per_expert.size())
      fail(li / "tokensPerExpert", num(e.tokens_per_expert.size()) + " experts, expected " +
                                       num(x.expert_load[0].tokens_per_expert.size()) + " as in every layer");
    x.expert_load.push_back(std::move(e));
  }
  return x;
}

CheckpointManifest read_manifest(wire::CheckpointManifest::Reader r, const DecodeLimits& l, const Path& p) {
  CheckpointManifest x;
  x.folder = read_text(r.getFolder(), l.max_name_bytes, p / "folder", true);
  x.step = read_step_id(r.getStep(), l, p / "step");
  auto files = r.getFiles();
  const Path fp = p / "files";
  if (files.size() == 0) fail(fp, "empty, expected the checkpoint's files");
  if (files.size() > l.max_files) fail(fp, num(files.size()) + " files, at most " + num(l.max_files) + " allowed");
  std::set<std::string> seen;
  for (unsigned i = 0; i < files.size(); ++i) {
    const Path fi = fp.at(i);
    auto f = files[i];
    FileEntry e;
    e.path = read_text(f.getPath(), l.max_name_bytes, fi / "path", true);
    if (e.path.front() == '/') fail(fi / "path", "'" + e.path + "' is absolute, expected a path inside the folder");
    if (e.path.find('\0') != std::string::npos) fail(fi / "path", "contains a NUL byte");
    for (size_t begin = 0; begin <= e.path.size();) {
      size_t end = e.path.find('/', begin);
      if (end == std::string::npos) end = e.path.size();
      if (e.path.compare(begin, end - begin, "..") == 0)
        fail(fi / "path", "'" + e.path + "' leaves the folder ('..'), expected a path inside it");
      begin = end + 1;
    }
    if (!seen.insert(e.path).second) fail(fi / "path", "'" + e.path + "' is listed twice");
    e.bytes = f.getBytes();
    e.checksum_kind = read_enum<ChecksumKind>(f.getChecksumKind(), we::kChecksumKinds, fi / "checksumKind");
    e.checksum = read_data(f.getChecksum(), 32, fi / "checksum");
    const size_t want = e.checksum_kind == ChecksumKind::Sha256 ? 32 : 4;
    if (e.checksum.size() != want)
      fail(fi / "checksum", num(e.checksum.size()) + " bytes, expected " + num(want) + " for " +
                                (e.checksum_kind == ChecksumKind::Sha256 ? "sha256" : "crc32c"));
    x.files.push_back(std::move(e));
  }
  return x;
}

SamplingParams read_sampling(wire::SamplingParams::Reader r, const DecodeLimits& l, const Path& p) {
  SamplingParams x;
  x.temperature = r.getTemperature();
  check_finite(x.temperature, p / "temperature");
  if (x.temperature < 0) fail(p / "temperature", std::to_string(x.temperature) + ", expected >= 0 (0: greedy)");
  x.top_p = r.getTopP();
  check_finite(x.top_p, p / "topP");
  if (!(x.top_p > 0 && x.top_p <= 1)) fail(p / "topP", std::to_string(x.top_p) + ", expected in (0, 1]");
  x.top_k = r.getTopK();
  if (l.vocab > 0 && x.top_k > l.vocab) fail(p / "topK", num(x.top_k) + ", more than the vocabulary " + num(l.vocab));
  x.max_new_tokens = r.getMaxNewTokens();
  if (x.max_new_tokens == 0 || x.max_new_tokens > l.max_sequence)
    fail(p / "maxNewTokens", num(x.max_new_tokens) + ", expected in [1, " + num(l.max_sequence) + "]");
  x.stop_ids = read_list<int32_t>(r.getStopIds(), l.max_sequence, p / "stopIds");
  check_tokens(x.stop_ids, l, p / "stopIds");
  x.seed = r.getSeed();
  return x;
}

GenerationRequest read_request(wire::GenerationRequest::Reader r, const DecodeLimits& l, const Path& p) {
  GenerationRequest x;
  x.request_id = r.getRequestId();
  x.prompt_ids = read_list<int32_t>(r.getPromptIds(), l.max_sequence, p / "promptIds");
  if (x.prompt_ids.empty()) fail(p / "promptIds", "empty, expected at least one prompt token");
  check_tokens(x.prompt_ids, l, p / "promptIds");
  x.sampling = read_sampling(r.getSampling(), l, p / "sampling");
  x.policy_version = read_policy(r.getPolicyVersion());
  x.samples = r.getSamples();
  if (x.samples == 0 || x.samples > l.max_samples)
    fail(p / "samples", num(x.samples) + ", expected in [1, " + num(l.max_samples) + "]");
  return x;
}

Rollout read_rollout(wire::Rollout::Reader r, const DecodeLimits& l, const Path& p) {
  Rollout x;
  x.request_id = r.getRequestId();
  x.sample_index = r.getSampleIndex();
  x.prompt_ids = read_list<int32_t>(r.getPromptIds(), l.max_sequence, p / "promptIds");
  if (x.prompt_ids.empty()) fail(p / "promptIds", "empty, expected at least one prompt token");
  check_tokens(x.prompt_ids, l, p / "promptIds");
  x.response_ids = read_list<int32_t>(r.getResponseIds(), l.max_sequence, p / "responseIds");
  check_tokens(x.response_ids, l, p / "responseIds");
  auto log_probs = r.getLogProbs();
  if (log_probs.size() != x.response_ids.size())
    fail(p / "logProbs",
         num(log_probs.size()) + " entries, expected one per response token (" + num(x.response_ids.size()) + ")");
  x.log_probs = read_list<float>(log_probs, l.max_sequence, p / "logProbs");
  for (size_t i = 0; i < x.log_probs.size(); ++i)
    if (!(std::isfinite(x.log_probs[i]) && x.log_probs[i] <= 0))
      fail((p / "logProbs").at(i), std::to_string(x.log_probs[i]) + ", expected a finite log-probability <= 0");
  x.policy_version = read_policy(r.getPolicyVersion());
  x.finish_reason = read_enum<FinishReason>(r.getFinishReason(), we::kFinishReasons, p / "finishReason");
  if (x.finish_reason != FinishReason::Aborted && x.response_ids.empty())
    fail(p / "responseIds", "empty, expected at least one token unless finishReason = aborted");
  return x;
}

Utterance read_utterance(wire::Utterance::Reader r, const DecodeLimits& l, const Path& p) {
  Utterance x;
  x.text = read_text(r.getText(), l.max_text_bytes, p / "text", true);
  x.ids = read_list<int32_t>(r.getIds(), l.max_sequence, p / "ids");
  check_tokens(x.ids, l, p / "ids");
  return x;
}

void check_timestamp(int64_t ns, const Path& p) {
  if (ns <= 0) fail(p, std::to_string(ns) + ", expected nanoseconds since the Unix epoch (> 0)");
}

Comparison read_comparison(wire::Comparison::Reader r, const DecodeLimits& l, const Path& p) {
  Comparison x;
  x.schema_version = r.getSchemaVersion();
  check_schema_version(x.schema_version, p);
  x.prompt = read_utterance(r.getPrompt(), l, p / "prompt");
  x.first = read_utterance(r.getFirst(), l, p / "first");
  x.second = read_utterance(r.getSecond(), l, p / "second");
  x.choice = read_enum<Choice>(r.getChoice(), we::kChoices, p / "choice");
  x.annotator = read_text(r.getAnnotator(), l.max_name_bytes, p / "annotator", true);
  x.timestamp_ns = r.getTimestampNs();
  check_timestamp(x.timestamp_ns, p / "timestampNs");
  x.first_policy = read_policy(r.getFirstPolicy());
  x.second_policy = read_policy(r.getSecondPolicy());
  return x;
}

Rating read_rating(wire::Rating::Reader r, const DecodeLimits& l, const Path& p) {
  Rating x;
  x.schema_version = r.getSchemaVersion();
  check_schema_version(x.schema_version, p);
  x.prompt = read_utterance(r.getPrompt(), l, p / "prompt");
  x.response = read_utterance(r.getResponse(), l, p / "response");
  x.score = r.getScore();
  x.scale_min = r.getScaleMin();
  x.scale_max = r.getScaleMax();
  check_finite(x.scale_min, p / "scaleMin");
  check_finite(x.scale_max, p / "scaleMax");
  if (!(x.scale_min < x.scale_max))
    fail(p / "scaleMax", std::to_string(x.scale_max) + ", expected > scaleMin = " + std::to_string(x.scale_min));
  check_finite(x.score, p / "score");
  if (x.score < x.scale_min || x.score > x.scale_max)
    fail(p / "score", std::to_string(x.score) + ", expected in [" + std::to_string(x.scale_min) + ", " +
                          std::to_string(x.scale_max) + "]");
  x.annotator = read_text(r.getAnnotator(), l.max_name_bytes, p / "annotator", true);
  x.timestamp_ns = r.getTimestampNs();
  check_timestamp(x.timestamp_ns, p / "timestampNs");
  x.policy = read_policy(r.getPolicy());
  return x;
}

Correction read_correction(wire::Correction::Reader r, const DecodeLimits& l, const Path& p) {
  Correction x;
  x.schema_version = r.getSchemaVersion();
  check_schema_version(x.schema_version, p);
  x.prompt = read_utterance(r.getPrompt(), l, p / "prompt");
  x.original = read_utterance(r.getOriginal(), l, p / "original");
  x.corrected = read_text(r.getCorrected(), l.max_text_bytes, p / "corrected", true);
  x.annotator = read_text(r.getAnnotator(), l.max_name_bytes, p / "annotator", true);
  x.timestamp_ns = r.getTimestampNs();
  check_timestamp(x.timestamp_ns, p / "timestampNs");
  x.policy = read_policy(r.getPolicy());
  return x;
}

ReplayRecord read_replay(wire::ReplayRecord::Reader r, const DecodeLimits& l, const Path& p) {
  ReplayRecord x;
  x.schema_version = r.getSchemaVersion();
  check_schema_version(x.schema_version, p);
  x.rollout = read_rollout(r.getRollout(), l, p / "rollout");
  const size_t n = x.rollout.response_ids.size();
  x.score = r.getScore();
  check_finite(x.score, p / "score");
  x.rewards = read_list<float>(r.getRewards(), l.max_sequence, p / "rewards");
  if (!x.rewards.empty() && x.rewards.size() != n)
    fail(p / "rewards", num(x.rewards.size()) + " entries, expected none or one per response token (" + num(n) + ")");
  check_finite_all(x.rewards, p / "rewards");
  x.advantages = read_list<float>(r.getAdvantages(), l.max_sequence, p / "advantages");
  if (x.advantages.size() != n)
    fail(p / "advantages", num(x.advantages.size()) + " entries, expected one per response token (" + num(n) + ")");
  check_finite_all(x.advantages, p / "advantages");
  x.group_id = r.getGroupId();
  x.step = read_step_id(r.getStep(), l, p / "step");
  return x;
}

// Frames `bytes` as one message of `kind`, reads its root as Wire with `read`, and turns every Cap'n Proto
// failure (bad segment table, out-of-bounds or mistyped pointer, traversal or nesting limit) into Error.
template <class Wire, class Read>
auto decode_as(MessageKind kind, std::span<const uint8_t> bytes, const DecodeLimits& limits, Read read) {
  const std::string name(kind_name(kind));
  // A Cap'n Proto stream is whole 8-byte words: a ragged length is a truncated or padded message.
  if (bytes.empty() || bytes.size() % sizeof(capnp::word) != 0)
    throw Error(name + ": " + num(bytes.size()) +
                " bytes, expected a non-empty multiple of 8 (one Cap'n Proto message)");
  kj::Array<capnp::word> aligned;
  kj::ArrayPtr<const capnp::word> words;
  if (reinterpret_cast<uintptr_t>(bytes.data()) % alignof(capnp::word) == 0) {
    words = kj::arrayPtr(reinterpret_cast<const capnp::word*>(bytes.data()), bytes.size() / sizeof(capnp::word));
  } else {
    aligned = kj::heapArray<capnp::word>(bytes.size() / sizeof(capnp::word));
    std::memcpy(aligned.begin(), bytes.data(), bytes.size());
    words = aligned;
  }
  capnp::ReaderOptions options;
  options.traversalLimitInWords = traversal_limit_words(kind, limits);
  options.nestingLimit = limits.nesting_limit;
  try {
    capnp::FlatArrayMessageReader reader(words, options);
    if (reader.getEnd() != words.end())
      throw Error(name + ": " + num(static_cast<uint64_t>(words.end() - reader.getEnd()) * 8) +
                  " bytes after the end of the message, expected exactly one message");
    return read(reader.getRoot<Wire>(), limits, Path{name.c_str()});
  } catch (const kj::Exception& e) {
    throw Error(name + ": malformed Cap'n Proto message (" + std::string(e.getDescription().cStr()) + ")");
  }
}

}  // namespace

TensorRef decode_tensor_ref(std::span<const uint8_t> b, const DecodeLimits& l) {
  return decode_as<wire::TensorRef>(MessageKind::TensorRef, b, l, read_tensor_ref);
}
ActorError decode_actor_error(std::span<const uint8_t> b, const DecodeLimits& l) {
  return decode_as<wire::ActorError>(MessageKind::ActorError, b, l, read_actor_error);
}
TokenBatch decode_token_batch(std::span<const uint8_t> b, const DecodeLimits& l) {
  return decode_as<wire::TokenBatch>(MessageKind::TokenBatch, b, l,
                                     [](wire::TokenBatch::Reader r, const DecodeLimits& lim, const Path& p) {
                                       uint64_t tokens_left = lim.max_batch_tokens;
                                       return read_batch(r, lim, p, tokens_left);
                                     });
}
TrainStep decode_train_step(std::span<const uint8_t> b, const DecodeLimits& l) {
  return decode_as<wire::TrainStep>(MessageKind::TrainStep, b, l, read_train_step);
}
TrainStepResult decode_train_step_result(std::span<const uint8_t> b, const DecodeLimits& l) {
  return decode_as<wire::TrainStepResult>(MessageKind::TrainStepResult, b, l, read_train_step_result);
}
CheckpointManifest decode_checkpoint_manifest(std::span<const uint8_t> b, const DecodeLimits& l) {
  return decode_as<wire::CheckpointManifest>(MessageKind::CheckpointManifest, b, l, read_manifest);
}
GenerationRequest decode_generation_request(std::span<const uint8_t> b, const DecodeLimits& l) {
  return decode_as<wire::GenerationRequest>(MessageKind::GenerationRequest, b, l, read_request);
}
Rollout decode_rollout(std::span<const uint8_t> b, const DecodeLimits& l) {
  return decode_as<wire::Rollout>(MessageKind::Rollout, b, l, read_rollout);
}
Comparison decode_comparison(std::span<const uint8_t> b, const DecodeLimits& l) {
  return decode_as<wire::Comparison>(MessageKind::Comparison, b, l, read_comparison);
}
Rating decode_rating(std::span<const uint8_t> b, const DecodeLimits& l) {
  return decode_as<wire::Rating>(MessageKind::Rating, b, l, read_rating);
}
Correction decode_correction(std::span<const uint8_t> b, const DecodeLimits& l) {
  return decode_as<wire::Correction>(MessageKind::Correction, b, l, read_correction);
}
ReplayRecord decode_replay_record(std::span<const uint8_t> b, const DecodeLimits& l) {
  return decode_as<wire::ReplayRecord>(MessageKind::ReplayRecord, b, l, read_replay);
}

}  // namespace moerl::msg
