#include "actors/cluster/record_roles.hpp"

#include <nlohmann/json.hpp>

#include "actors/roles/feedback_collector.hpp"
#include "actors/roles/replay_buffer.hpp"
#include "runtime/error.hpp"

namespace moerl::cluster {
namespace fs = std::filesystem;
using Json = nlohmann::json;

namespace {

std::string dir_of(const RoleSpec& spec, const Json& j) {
  if (!j.is_object() || !j.contains("dir") || !j["dir"].is_string() || j["dir"].get<std::string>().empty())
    throw Error("role " + spec.name + " config: expected \"dir\", the store's folder");
  return j["dir"].get<std::string>();
}

}  // namespace

void add_record_roles(RoleCatalog& catalog) {
  catalog.add("roles.feedback_collector", [](caf::actor_system& system, const RoleSpec& spec) {
    const Json j = role_config_json(spec);
    return caf::actor_cast<caf::actor>(actors::spawn_feedback_collector(system, spec.name, dir_of(spec, j)));
  });
  catalog.add("roles.replay_buffer", [](caf::actor_system& system, const RoleSpec& spec) {
    const Json j = role_config_json(spec);
    const std::string dir = dir_of(spec, j);
    if (!j.contains("capacity") || !j["capacity"].is_number_unsigned() || j["capacity"].get<uint64_t>() == 0)
      throw Error("role " + spec.name + " config: expected \"capacity\", the records kept (an integer > 0)");
    return caf::actor_cast<caf::actor>(
        actors::spawn_replay_buffer(system, static_cast<size_t>(j["capacity"].get<uint64_t>()), spec.name, dir));
  });
}

std::string feedback_collector_config(const fs::path& dir) { return Json{{"dir", fs::absolute(dir).string()}}.dump(); }

std::string replay_buffer_config(const fs::path& dir, uint64_t capacity) {
  return Json{{"dir", fs::absolute(dir).string()}, {"capacity", capacity}}.dump();
}

}  // namespace moerl::cluster
