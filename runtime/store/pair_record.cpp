// PairToJudge codec and the JSONL export.
#include "runtime/store/pair_record.hpp"

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/exception.h>

#include <cstring>
#include <nlohmann/json.hpp>

#include "runtime/error.hpp"
#include "schemas/feedback.capnp.h"

namespace moerl::store {
namespace {

capnp::Text::Reader text_of(const std::string& s) { return capnp::Text::Reader(s.data(), s.size()); }

void fill(wire::Utterance::Builder b, const msg::Utterance& u) {
  b.setText(text_of(u.text));
  auto ids = b.initIds(static_cast<unsigned>(u.ids.size()));
  for (size_t i = 0; i < u.ids.size(); ++i) ids.set(static_cast<unsigned>(i), u.ids[i]);
}

void fill(wire::PolicyVersion::Builder b, const msg::PolicyVersion& p) {
  b.setVersion(p.version);
  b.setStep(p.step);
}

[[noreturn]] void fail(const std::string& field, const std::string& what) {
  throw Error("PairToJudge." + field + ": " + what);
}

msg::Utterance read(wire::Utterance::Reader r, const msg::DecodeLimits& l, const std::string& field) {
  msg::Utterance u;
  const auto text = r.getText();
  if (text.size() == 0) fail(field + ".text", "empty, expected a non-empty text");
  if (text.size() > l.max_text_bytes)
    fail(field + ".text", std::to_string(text.size()) + " bytes, at most " + std::to_string(l.max_text_bytes) + " allowed");
  u.text.assign(text.cStr(), text.size());
  const auto ids = r.getIds();
  if (ids.size() > l.max_sequence)
    fail(field + ".ids", std::to_string(ids.size()) + " entries, at most " + std::to_string(l.max_sequence) + " allowed");
  for (int32_t id : ids) {
    if (id < 0 || (l.vocab > 0 && id >= l.vocab)) fail(field + ".ids", "token id " + std::to_string(id) + " out of range");
    u.ids.push_back(id);
  }
  return u;
}

msg::PolicyVersion read(wire::PolicyVersion::Reader r) { return {r.getVersion(), r.getStep()}; }

nlohmann::json policy_json(const msg::PolicyVersion& p) { return {{"version", p.version}, {"step", p.step}}; }

}  // namespace

std::vector<uint8_t> encode(const PairToJudge& x) {
  capnp::MallocMessageBuilder message;
  auto b = message.initRoot<wire::PairToJudge>();
  b.setSchemaVersion(x.schema_version);
  b.setPairId(x.pair_id);
  fill(b.initPrompt(), x.prompt);
  fill(b.initFirst(), x.first);
  fill(b.initSecond(), x.second);
  fill(b.initFirstPolicy(), x.first_policy);
  fill(b.initSecondPolicy(), x.second_policy);
  b.setCreatedNs(x.created_ns);
  const auto words = capnp::messageToFlatArray(message);
  const auto bytes = words.asBytes();
  return std::vector<uint8_t>(bytes.begin(), bytes.end());
}

PairToJudge decode_pair(std::span<const uint8_t> bytes, const msg::DecodeLimits& l) {
  if (bytes.size() % 8 != 0 || bytes.empty())
    throw Error("PairToJudge: " + std::to_string(bytes.size()) + " bytes, expected a whole number of 8-byte words");
  std::vector<capnp::word> words(bytes.size() / 8);
  std::memcpy(words.data(), bytes.data(), bytes.size());
  try {
    capnp::ReaderOptions options;
    // Three utterances at their largest, plus struct overhead.
    options.traversalLimitInWords = 3 * (l.max_text_bytes / 8 + l.max_sequence / 2 + 8) + 64;
    options.nestingLimit = l.nesting_limit;
    capnp::FlatArrayMessageReader reader(kj::arrayPtr(words.data(), words.size()), options);
    if (reader.getEnd() != words.data() + words.size()) throw Error("PairToJudge: trailing bytes after the message");
    const auto r = reader.getRoot<wire::PairToJudge>();
    PairToJudge x;
    x.schema_version = r.getSchemaVersion();
    if (x.schema_version != msg::kFeedbackSchemaVersion)
      fail("schemaVersion", std::to_string(x.schema_version) + ", this build reads version " +
                                std::to_string(msg::kFeedbackSchemaVersion));
    x.pair_id = r.getPairId();
    if (x.pair_id == 0) fail("pairId", "0, expected > 0");
    x.prompt = read(r.getPrompt(), l, "prompt");
    x.first = read(r.getFirst(), l, "first");
    x.second = read(r.getSecond(), l, "second");
    x.first_policy = read(r.getFirstPolicy());
    x.second_policy = read(r.getSecondPolicy());
    x.created_ns = r.getCreatedNs();
    if (x.created_ns <= 0) fail("createdNs", std::to_string(x.created_ns) + ", expected > 0");
    return x;
  } catch (const kj::Exception& e) {
    throw Error(std::string("PairToJudge: malformed message: ") + e.getDescription().cStr());
  }
}

std::string comparison_jsonl(const msg::Comparison& c) {
  const bool second = c.choice == msg::Choice::SecondChosen;
  nlohmann::json j = {{"prompt", c.prompt.text},
                      {"chosen", second ? c.second.text : c.first.text},
                      {"rejected", second ? c.first.text : c.second.text},
                      {"tie", c.choice == msg::Choice::Tie},
                      {"annotator", c.annotator},
                      {"timestamp_ns", c.timestamp_ns},
                      {"chosen_policy", policy_json(second ? c.second_policy : c.first_policy)},
                      {"rejected_policy", policy_json(second ? c.first_policy : c.second_policy)}};
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

std::string rating_jsonl(const msg::Rating& r) {
  nlohmann::json j = {{"prompt", r.prompt.text},       {"completion", r.response.text}, {"score", r.score},
                      {"scale_min", r.scale_min},      {"scale_max", r.scale_max},      {"annotator", r.annotator},
                      {"timestamp_ns", r.timestamp_ns}, {"policy_version", policy_json(r.policy)}};
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

std::string correction_jsonl(const msg::Correction& c) {
  nlohmann::json j = {{"prompt", c.prompt.text},       {"completion", c.corrected}, {"original", c.original.text},
                      {"annotator", c.annotator},      {"timestamp_ns", c.timestamp_ns},
                      {"policy_version", policy_json(c.policy)}};
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace moerl::store
