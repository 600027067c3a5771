// The node side of the cluster: the spawner that starts roles for the head, and the join handshake.
#pragma once
#include <chrono>
#include <functional>
#include <string>

#include <caf/all.hpp>

#include "actors/cluster/catalog.hpp"
#include "actors/cluster/protocol.hpp"

namespace moerl::cluster {

// Called once when the spawner ends: `reason` for the log; `lost` is true when the head went away without a
// shutdown (crash, network), false when the head ended the cluster.
using ShutdownHook = std::function<void(const std::string& reason, bool lost)>;

// Starts a spawner for node `name`. It serves only requests from actors of `head_node` (the head's process);
// when `watch` is set (a node's handle to the head) it monitors it and ends when the head goes down. On its
// end it stops every role it started and calls `on_shutdown`.
spawner_actor spawn_spawner(caf::actor_system& system, RoleCatalog catalog, std::string name, caf::node_id head_node,
                            caf::actor watch, ShutdownHook on_shutdown);

// This machine's resources, advertising the catalog's kinds.
NodeResources local_resources(const RoleCatalog& catalog);

// The join handshake (auth.hpp) from the node side, blocking: hello, check the head's proof, join with
// `spawner`. Returns the name the head registered, or an error saying why it failed ("wrong secret", ...).
caf::expected<std::string> join_cluster(caf::actor_system& system, const head_actor& head, const std::string& secret,
                                        const std::string& name, const NodeResources& resources,
                                        const spawner_actor& spawner, std::chrono::milliseconds timeout);

// One log line on stderr: "[12:03:04.512] moerl node a: started role trainer (cluster.trainer)".
void log_line(const std::string& text);

}  // namespace moerl::cluster
