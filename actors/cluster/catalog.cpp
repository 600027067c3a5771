#include "actors/cluster/catalog.hpp"

#include <exception>

#include "runtime/error.hpp"

namespace moerl::cluster {

void RoleCatalog::add(const std::string& kind, RoleFactory factory) {
  require(valid_name(kind), "role kind \"" + kind + "\": expected [A-Za-z0-9._-], 1..64 characters");
  require(!has(kind), "role kind \"" + kind + "\" is added twice to the catalog");
  factories_[kind] = std::move(factory);
}

std::vector<std::string> RoleCatalog::kinds() const {
  std::vector<std::string> out;
  for (const auto& [kind, factory] : factories_) out.push_back(kind);
  return out;
}

caf::expected<caf::actor> RoleCatalog::spawn(caf::actor_system& system, const RoleSpec& spec) const {
  const auto it = factories_.find(spec.kind);
  if (it == factories_.end())
    return make_cluster_error("role " + spec.name + ": this node has no role kind \"" + spec.kind + "\"");
  try {
    caf::actor role = it->second(system, spec);
    if (!role) return make_cluster_error("role " + spec.name + " (" + spec.kind + "): the factory returned no actor");
    return role;
  } catch (const std::exception& e) {
    return make_cluster_error("role " + spec.name + " (" + spec.kind + "): " + e.what());
  }
}

namespace {

echo_actor::behavior_type echo(echo_actor::pointer) {
  return {[](ping_atom, uint64_t x) { return x; }};
}

}  // namespace

nlohmann::json role_config_json(const RoleSpec& spec) {
  try {
    return nlohmann::json::parse(spec.config);
  } catch (const nlohmann::json::exception& e) {
    throw Error("role " + spec.name + " config: not JSON (" + e.what() + ")");
  }
}

void add_cluster_roles(RoleCatalog& catalog) {
  catalog.add("cluster.echo", [](caf::actor_system& system, const RoleSpec&) {
    return caf::actor_cast<caf::actor>(system.spawn(echo));
  });
}

}  // namespace moerl::cluster
