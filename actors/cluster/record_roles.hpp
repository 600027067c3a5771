// Catalog entries for the roles that keep records (actors/roles/feedback_collector.hpp, replay_buffer.hpp), so
// a run can have the supervisor place them on a node of the cluster and restart them there when they die; a
// restarted one opens the same folder and holds every record it acknowledged:
//
//   "roles.feedback_collector"  config: {"dir": store folder}
//   "roles.replay_buffer"       config: {"dir": store folder, "capacity": records kept (> 0)}
//
// The folder must be on the node (a restart on another node finds another folder, or a shared file system's).
// The handle comes back as caf::actor: actor_cast it to feedback_collector_actor or replay_buffer_actor.
#pragma once
#include <cstdint>
#include <filesystem>
#include <string>

#include "actors/cluster/catalog.hpp"

namespace moerl::cluster {

void add_record_roles(RoleCatalog& catalog);

// The configs above, as JSON text for RoleSpec::config (the folder made absolute).
std::string feedback_collector_config(const std::filesystem::path& dir);
std::string replay_buffer_config(const std::filesystem::path& dir, uint64_t capacity);

}  // namespace moerl::cluster
