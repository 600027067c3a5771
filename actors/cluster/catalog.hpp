// What a process can run: role kinds and the factory that starts each. `moerl node` and `moerl head` build
// their catalog in main (wiring, no self-registration) and advertise its kinds when they join; placement
// only chooses nodes that offer a role's kind.
#pragma once
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <caf/all.hpp>
#include <nlohmann/json.hpp>

#include "actors/cluster/protocol.hpp"

namespace moerl::cluster {

// Starts one role in `system` from its spec (spec.config is the role's JSON) and returns its handle. May throw
// moerl::Error for a bad config; heavy roles should run detached (their own thread) so that a long step does
// not hold a scheduler worker.
using RoleFactory = std::function<caf::actor(caf::actor_system& system, const RoleSpec& spec)>;

class RoleCatalog {
 public:
  void add(const std::string& kind, RoleFactory factory);
  bool has(const std::string& kind) const { return factories_.count(kind) > 0; }
  std::vector<std::string> kinds() const;
  // The role started, or an error naming the role and what went wrong (unknown kind, bad config).
  caf::expected<caf::actor> spawn(caf::actor_system& system, const RoleSpec& spec) const;

 private:
  std::map<std::string, RoleFactory> factories_;
};

// spec.config parsed as JSON; not JSON: moerl::Error "role <name> config: not JSON (...)".
nlohmann::json role_config_json(const RoleSpec& spec);

// Adds the cluster's own kinds: "cluster.echo" (echo_actor: answers pings).
void add_cluster_roles(RoleCatalog& catalog);

}  // namespace moerl::cluster
