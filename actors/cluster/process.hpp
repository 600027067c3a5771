// The two kinds of cluster process: `moerl head` and `moerl node` (actors/cli/ parses their flags into these
// options and wires the role catalog).
//
// Starting a cluster (one machine shown; on several, give the head --host 0.0.0.0 and copy the secret file):
//   moerl head --port 7400                        # writes ./moerl-cluster.secret (mode 600) if missing
//   moerl node --join 127.0.0.1:7400 --name a     # reads ./moerl-cluster.secret
//   moerl node --join 127.0.0.1:7400 --name b
// or let the head run a recipe once `--nodes` nodes have joined, then end the cluster:
//   moerl head --port 7400 --run recipes/x.yaml --nodes 2 --placement trainer=b --placement loader=a
#pragma once
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

#include "actors/cluster/catalog.hpp"
#include "actors/cluster/cluster_run.hpp"
#include "actors/cluster/supervisor.hpp"
#include "actors/cluster/system.hpp"

namespace moerl::cluster {

// The secret file both commands use when --secret-file is not given.
inline constexpr const char* kDefaultSecretFile = "moerl-cluster.secret";

struct HeadOptions {
  std::string host = "127.0.0.1";     // interface to listen on ("0.0.0.0": all)
  uint16_t port = 7400;               // 0: any free port (see port_file)
  std::filesystem::path secret_file;  // empty: kDefaultSecretFile, created when missing
  std::filesystem::path port_file;    // when set, the bound port is written there once listening
  std::string name = "head";          // the head's own node name (it runs roles too, unless !local_roles)
  bool local_roles = true;
  NetOptions net;
  RoleCatalog catalog;                // roles the head process can run
  std::optional<ClusterRunOptions> run;  // run this recipe, then end the cluster
  int wait_nodes = 0;                 // remote nodes that must have joined before the run starts
  std::chrono::seconds wait_timeout{120};
};

struct NodeOptions {
  std::string host;                   // the head's address
  uint16_t port = 0;
  std::filesystem::path secret_file;  // empty: kDefaultSecretFile
  std::string name;                   // empty: <hostname>-<pid>
  NetOptions net;
  RoleCatalog catalog;
  std::chrono::seconds connect_timeout{30};  // keep trying to reach the head this long (also when rejoining)
  // After losing the head (its process died, the network broke), stop every role here and join again; a
  // node that cannot rejoin within connect_timeout exits with 1.
  bool rejoin = true;
};

// Both return the process's exit code: 0 when the cluster ended normally; they throw moerl::Error for bad
// options and failed runs. A node returns 1 when the head refused it (wrong secret, name taken) or was lost
// for good.
int run_head(const HeadOptions& options);
int run_node(const NodeOptions& options);

// A cluster inside one actor system, for `moerl run` and tests: a registry (not published), this process as its
// only node (named `name`, offering `catalog`), and a supervisor over it. Roles placed through `supervisor` are
// monitored and restarted like in a real cluster; a remote node may still join if the registry is published
// later. stop() ends all three (and the roles).
struct LocalCluster {
  head_actor registry;
  spawner_actor spawner;
  supervisor_actor supervisor;
  void stop();
};
LocalCluster start_local_cluster(caf::actor_system& system, const RoleCatalog& catalog, const std::string& name = "local",
                                 SupervisorOptions options = {});

// SIGINT and SIGTERM end a head or node cleanly (its nodes, or its roles, are told first).
void install_stop_signals();

}  // namespace moerl::cluster
