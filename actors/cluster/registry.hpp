// The head's registry of nodes: it authenticates joining nodes (auth.hpp), keeps each node's name,
// resources and liveness (it monitors every node's spawner: a dead process or a broken connection sends it
// a down message at once, a silent one after the heartbeat timeout), starts roles on nodes for the
// supervisor, and tells its subscribers when nodes come and go. Every join, refusal and loss is logged.
#pragma once
#include <string>

#include <caf/all.hpp>

#include "actors/cluster/protocol.hpp"

namespace moerl::cluster {

// How long a challenge stays valid, and how many may be open at once (older ones are dropped first).
inline constexpr int kSessionSeconds = 30;
inline constexpr size_t kMaxOpenSessions = 256;

head_actor spawn_registry(caf::actor_system& system, std::string secret);

}  // namespace moerl::cluster
