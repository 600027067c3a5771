#include "actors/cluster/protocol.hpp"

namespace moerl::cluster {

void register_cluster_types(caf::actor_system_config& cfg) {
  cfg.add_message_type<NodeHello>("moerl.NodeHello");
  cfg.add_message_type<Challenge>("moerl.Challenge");
  cfg.add_message_type<NodeResources>("moerl.NodeResources");
  cfg.add_message_type<JoinRequest>("moerl.JoinRequest");
  cfg.add_message_type<NodeInfo>("moerl.NodeInfo");  // also std::vector<NodeInfo>
  cfg.add_message_type<RoleSpec>("moerl.RoleSpec");
  cfg.add_message_type<Bytes>("moerl.Bytes");
}

std::string describe(const caf::error& error) {
  if (!error) return "no error";
  const caf::message& context = error.context();
  if (error.category() == caf::atom("system")) {
    if (error.code() == static_cast<uint8_t>(caf::sec::runtime_error) && context.match_elements<std::string>())
      return context.get_as<std::string>(0);
    std::string text = caf::to_string(static_cast<caf::sec>(error.code()));
    if (!context.empty()) text += " (" + caf::to_string(context) + ")";
    return text;
  }
  if (error.category() == caf::atom("exit")) return caf::to_string(static_cast<caf::exit_reason>(error.code()));
  return caf::to_string(error);
}

caf::error make_cluster_error(std::string message) {
  return caf::make_error(caf::sec::runtime_error, std::move(message));
}

bool valid_role_name(const std::string& name) {
  std::string without_slashes = name;
  for (char& c : without_slashes)
    if (c == '/') c = '_';
  return valid_name(without_slashes);
}

bool valid_name(const std::string& name) {
  if (name.empty() || name.size() > 64) return false;
  for (char c : name)
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
          c == '-'))
      return false;
  return true;
}

}  // namespace moerl::cluster
