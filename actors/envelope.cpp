#include "actors/envelope.hpp"

namespace moerl::actors {
namespace {
const caf::atom_value kCategory = caf::atom("moerl");
}  // namespace

caf::error actor_error(msg::ErrorCode code, std::string message, std::string actor, msg::StepId step) {
  if (message.empty()) message = "failed without a message";
  if (message.size() > msg::DecodeLimits{}.max_text_bytes) message.resize(msg::DecodeLimits{}.max_text_bytes);
  const msg::ActorError err{code, std::move(message), std::move(actor), std::move(step)};
  return caf::error(static_cast<uint8_t>(1 + static_cast<uint8_t>(code)), kCategory, caf::make_message(wrap(err)));
}

std::optional<msg::ActorError> actor_error_of(const caf::error& e) {
  if (!e || e.category() != kCategory || !e.context().match_elements<Envelope>()) return std::nullopt;
  try {
    return unwrap<msg::ActorError>(e.context().get_as<Envelope>(0));
  } catch (const Error&) {
    return std::nullopt;
  }
}

std::string describe(const caf::error& e) {
  if (auto err = actor_error_of(e)) return err->actor.empty() ? err->message : err->actor + ": " + err->message;
  return caf::to_string(e);
}

void add_message_types(caf::actor_system_config& config) {
  config.add_message_type<Envelope>("moerl.Envelope");
  config.add_message_type<std::vector<Envelope>>("std::vector<moerl.Envelope>");
  config.add_message_type<RecordKey>("moerl.RecordKey");
  config.add_message_type<std::vector<RecordKey>>("std::vector<moerl.RecordKey>");
}

}  // namespace moerl::actors
