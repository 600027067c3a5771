// The cluster's messages and actor interfaces (CAF 0.17), shared by `moerl head` and `moerl node`.
//
// A cluster is one head process and any number of node processes joined to it through CAF's middleman
// (TCP, optionally TLS). The head publishes its registry (head_actor) on the cluster port; a node connects,
// authenticates (auth.hpp: hello -> challenge -> join, HMAC-SHA-256 over fresh nonces) and hands over its
// spawner (spawner_actor), through which the head starts roles on it. The head monitors every spawner: a node
// whose process dies or whose connection breaks (heartbeats, NetOptions) is noticed and reported to the
// subscribers (the supervisor), which restarts its roles elsewhere (supervisor.hpp).
//
// Every type here is registered on both sides (register_cluster_types); an unregistered type fails remotely
// with a misleading `unexpected_message` (DEPS.md).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <caf/all.hpp>

#include "actors/cluster/auth.hpp"

namespace moerl::cluster {

// Bumped whenever a message below changes shape; a node of another version is refused at hello.
inline constexpr uint32_t kProtocolVersion = 1;

using hello_atom = caf::atom_constant<caf::atom("hello")>;
using join_atom = caf::atom_constant<caf::atom("join")>;
using nodes_atom = caf::atom_constant<caf::atom("nodes")>;
using spawn_atom = caf::atom_constant<caf::atom("spawn")>;
using shutdown_atom = caf::atom_constant<caf::atom("shutdown")>;
using subscribe_atom = caf::atom_constant<caf::atom("subscribe")>;
using node_up_atom = caf::atom_constant<caf::atom("node_up")>;
using node_down_atom = caf::atom_constant<caf::atom("node_down")>;
using place_atom = caf::atom_constant<caf::atom("place")>;
using lookup_atom = caf::atom_constant<caf::atom("lookup")>;
using stop_atom = caf::atom_constant<caf::atom("stop")>;
using retry_atom = caf::atom_constant<caf::atom("retry")>;
using retire_atom = caf::atom_constant<caf::atom("retire")>;
using role_up_atom = caf::atom_constant<caf::atom("role_up")>;
using role_down_atom = caf::atom_constant<caf::atom("role_down")>;
using role_fail_atom = caf::atom_constant<caf::atom("role_fail")>;
using ping_atom = caf::atom_constant<caf::atom("ping")>;

// node -> head: the first message of a join.
struct NodeHello {
  uint32_t version = kProtocolVersion;
  std::string name;  // the node's name in the cluster: [A-Za-z0-9._-], 1..64 characters
  Bytes nonce;       // kNonceBytes fresh random bytes
};

// head -> node: the head's answer to a hello, with its proof of the secret.
struct Challenge {
  uint64_t session = 0;  // names this handshake in the join; valid once, for kSessionSeconds
  Bytes nonce;           // the head's kNonceBytes fresh random bytes
  Bytes proof;           // handshake_proof(secret, "moerl-head", name, node nonce, head nonce)
};

// What a node offers; shown by the registry and used for placement.
struct NodeResources {
  std::string host;                // host name
  int32_t pid = 0;                 // process id on that host
  int32_t cpus = 0;                // online cores
  int64_t memory_bytes = 0;        // physical memory
  std::vector<std::string> kinds;  // role kinds its catalog can start (catalog.hpp)
};

// node -> head: the second message of a join (sent with the node's spawner handle).
struct JoinRequest {
  uint64_t session = 0;
  Bytes proof;  // handshake_proof(secret, "moerl-node", name, head nonce, node nonce)
  NodeResources resources;
};

// A node as the registry sees it.
struct NodeInfo {
  std::string name;
  NodeResources resources;
  bool alive = true;
  bool local = false;        // runs inside the head process
  double joined_s = 0;       // seconds after the head started
  std::string left_reason;   // why it left (empty while alive)
};

// A role to run somewhere in the cluster: `kind` names a factory of the catalog, `config` is its JSON
// configuration (a string, so the cluster never needs to know a role's fields).
struct RoleSpec {
  std::string name;    // unique in a run: "trainer", "stage_trainer/0", ... (valid_role_name)
  std::string kind;    // "cluster.trainer", ...
  std::string node;    // placement: a node name; empty = any node that offers `kind`
  std::string config;  // JSON text, read by the role's factory
};

// -- inspect overloads (CAF 0.17: every message type, even for local sends) --

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, NodeHello& x) {
  return f(caf::meta::type_name("moerl.NodeHello"), x.version, x.name, x.nonce);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, Challenge& x) {
  return f(caf::meta::type_name("moerl.Challenge"), x.session, x.nonce, x.proof);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, NodeResources& x) {
  return f(caf::meta::type_name("moerl.NodeResources"), x.host, x.pid, x.cpus, x.memory_bytes, x.kinds);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, JoinRequest& x) {
  return f(caf::meta::type_name("moerl.JoinRequest"), x.session, x.proof, x.resources);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, NodeInfo& x) {
  return f(caf::meta::type_name("moerl.NodeInfo"), x.name, x.resources, x.alive, x.local, x.joined_s,
           x.left_reason);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, RoleSpec& x) {
  return f(caf::meta::type_name("moerl.RoleSpec"), x.name, x.kind, x.node, x.config);
}

// -- interfaces --

// A node's spawner: starts roles of its catalog when the head asks (requests from any other process are
// refused), and ends the node process on shutdown.
using spawner_actor = caf::typed_actor<caf::replies_to<spawn_atom, RoleSpec>::with<caf::actor>,
                                       caf::reacts_to<shutdown_atom, std::string>>;  // reason, logged

// The head's registry, published on the cluster port. hello and join are open to any peer (they are the
// authentication); the rest answers only actors of the head's own process.
using head_actor = caf::typed_actor<
    caf::replies_to<hello_atom, NodeHello>::with<Challenge>,
    caf::replies_to<join_atom, JoinRequest, caf::actor>::with<std::string>,  // spawner; replies the name
    caf::replies_to<nodes_atom>::with<std::vector<NodeInfo>>,
    caf::replies_to<spawn_atom, std::string, RoleSpec>::with<caf::actor>,  // on the named node
    // Subscribers receive (node_up_atom, NodeInfo) for every node up now and later, and
    // (node_down_atom, name, reason) when one leaves or is lost.
    caf::reacts_to<subscribe_atom, caf::actor>,
    caf::reacts_to<shutdown_atom, std::string>>;  // ends every node

// A role that answers pings: the cluster's health check and the remote round-trip benchmark.
using echo_actor = caf::typed_actor<caf::replies_to<ping_atom, uint64_t>::with<uint64_t>>;

// Registers the types above with `cfg` (both sides of a connection need them).
void register_cluster_types(caf::actor_system_config& cfg);

// The text of an error for a log line: the message of errors made by this cluster (make_cluster_error),
// CAF's rendering otherwise.
std::string describe(const caf::error& error);

// An error carrying `message` (sec::runtime_error with the text as context); `describe` returns the text.
caf::error make_cluster_error(std::string message);

// True when `name` is a valid node name or role kind: [A-Za-z0-9._-], 1..64 characters.
bool valid_name(const std::string& name);
// A role name may also contain '/' ("stage_trainer/0").
bool valid_role_name(const std::string& name);

}  // namespace moerl::cluster
