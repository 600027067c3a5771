#include "actors/cluster/registry.hpp"

#include <chrono>
#include <map>

#include "actors/cluster/auth.hpp"
#include "actors/cluster/spawner.hpp"

namespace moerl::cluster {
namespace {

using Clock = std::chrono::steady_clock;

struct Session {
  std::string name;
  Bytes node_nonce, head_nonce;
  caf::node_id peer;  // the process that said hello; only it may join with this session
  Clock::time_point opened;
};

struct Entry {
  NodeInfo info;
  spawner_actor spawner;
};

struct RegistryState {
  RegistryState() = default;  // not an aggregate: CAF would construct it from the actor pointer
  std::string secret;
  Clock::time_point start = Clock::now();
  uint64_t next_session = 1;
  std::map<uint64_t, Session> sessions;
  std::map<std::string, Entry> nodes;
  std::vector<caf::actor> subscribers;
};

using registry_pointer = head_actor::stateful_pointer<RegistryState>;

bool from_this_process(registry_pointer self) {
  const caf::strong_actor_ptr& sender = self->current_sender();
  return sender != nullptr && sender->node() == self->node();
}

std::string describe_node(const NodeInfo& n) {
  std::string kinds;
  for (const auto& k : n.resources.kinds) kinds += (kinds.empty() ? "" : ", ") + k;
  return "'" + n.name + "' (host " + n.resources.host + ", pid " + std::to_string(n.resources.pid) + ", " +
         std::to_string(n.resources.cpus) + " cpus, roles: " + (kinds.empty() ? "none" : kinds) + ")";
}

void drop_stale_sessions(RegistryState& st) {
  const auto now = Clock::now();
  for (auto it = st.sessions.begin(); it != st.sessions.end();)
    it = now - it->second.opened > std::chrono::seconds(kSessionSeconds) ? st.sessions.erase(it) : std::next(it);
  while (st.sessions.size() >= kMaxOpenSessions) st.sessions.erase(st.sessions.begin());  // oldest id first
}

head_actor::behavior_type registry(registry_pointer self, std::string secret) {
  self->state.secret = std::move(secret);
  self->set_down_handler([self](caf::down_msg& dm) {
    auto& st = self->state;
    for (auto& [name, entry] : st.nodes) {
      if (!entry.info.alive || entry.spawner.address() != dm.source) continue;
      entry.info.alive = false;
      entry.info.left_reason = dm.reason == caf::exit_reason::normal || dm.reason == caf::exit_reason::user_shutdown
                                   ? "shut down"
                                   : describe(dm.reason);
      const double after = std::chrono::duration<double>(Clock::now() - st.start).count() - entry.info.joined_s;
      log_line("moerl head: node '" + name + "' left after " + std::to_string(static_cast<int>(after)) + " s: " +
               entry.info.left_reason);
      for (const caf::actor& s : st.subscribers) caf::anon_send(s, node_down_atom::value, name, entry.info.left_reason);
      return;
    }
  });
  return {
      [self](hello_atom, const NodeHello& hello) -> caf::result<Challenge> {
        auto& st = self->state;
        if (hello.version != kProtocolVersion)
          return make_cluster_error("protocol version " + std::to_string(hello.version) + " is not this head's " +
                                    std::to_string(kProtocolVersion) + " (run the same moerl on every machine)");
        if (!valid_name(hello.name))
          return make_cluster_error("node name \"" + hello.name + "\": expected [A-Za-z0-9._-], 1..64 characters");
        if (hello.nonce.size() != kNonceBytes)
          return make_cluster_error("hello: the nonce must have " + std::to_string(kNonceBytes) + " bytes");
        if (!self->current_sender()) return make_cluster_error("hello: anonymous messages are refused");
        drop_stale_sessions(st);
        Session session{hello.name, hello.nonce, random_bytes(kNonceBytes), self->current_sender()->node(),
                        Clock::now()};
        Challenge challenge;
        challenge.session = st.next_session++;
        challenge.nonce = session.head_nonce;
        challenge.proof = handshake_proof(st.secret, "moerl-head", hello.name, hello.nonce, session.head_nonce);
        st.sessions.emplace(challenge.session, std::move(session));
        return challenge;
      },
      [self](join_atom, const JoinRequest& join, const caf::actor& spawner) -> caf::result<std::string> {
        auto& st = self->state;
        const auto it = st.sessions.find(join.session);
        const caf::strong_actor_ptr& sender = self->current_sender();
        if (it == st.sessions.end() || !sender || sender->node() != it->second.peer)
          return make_cluster_error("join: unknown or expired session (say hello first; a session is valid for " +
                                    std::to_string(kSessionSeconds) + " s and only once)");
        const Session session = it->second;
        st.sessions.erase(it);  // one attempt per challenge
        NodeInfo info;
        info.name = session.name;
        info.resources = join.resources;
        info.local = sender->node() == self->node();
        const Bytes expected = handshake_proof(st.secret, "moerl-node", session.name, session.head_nonce,
                                               session.node_nonce);
        if (!equal_in_constant_time(expected, join.proof)) {
          log_line("moerl head: refused node " + describe_node(info) + ": wrong secret (its proof of the cluster "
                   "secret did not match)");
          return make_cluster_error("the head refused node '" + session.name + "': wrong secret");
        }
        if (!spawner) return make_cluster_error("join: no spawner handle");
        if (auto old = st.nodes.find(session.name); old != st.nodes.end() && old->second.info.alive) {
          log_line("moerl head: refused node " + describe_node(info) + ": a node with this name is already in the "
                   "cluster");
          return make_cluster_error("the head refused node '" + session.name + "': the name is taken by a live node "
                                    "(pick another with --name)");
        }
        info.joined_s = std::chrono::duration<double>(Clock::now() - st.start).count();
        Entry entry{info, caf::actor_cast<spawner_actor>(spawner)};
        self->monitor(entry.spawner);
        st.nodes[session.name] = entry;
        log_line("moerl head: node " + describe_node(info) + " joined");
        for (const caf::actor& s : st.subscribers) caf::anon_send(s, node_up_atom::value, info);
        return session.name;
      },
      [self](nodes_atom) -> caf::result<std::vector<NodeInfo>> {
        if (!from_this_process(self)) return make_cluster_error("nodes: only the head's own actors may ask");
        std::vector<NodeInfo> out;
        for (const auto& [name, entry] : self->state.nodes) out.push_back(entry.info);
        return out;
      },
      [self](spawn_atom, const std::string& node, const RoleSpec& spec) -> caf::result<caf::actor> {
        if (!from_this_process(self)) return make_cluster_error("spawn: only the head's own actors may start roles");
        const auto it = self->state.nodes.find(node);
        if (it == self->state.nodes.end()) return make_cluster_error("node '" + node + "' is not in the cluster");
        if (!it->second.info.alive) return make_cluster_error("node '" + node + "' has left the cluster");
        auto promise = self->make_response_promise<caf::actor>();
        self->request(it->second.spawner, std::chrono::seconds(60), spawn_atom::value, spec)
            .then([promise](const caf::actor& role) mutable { promise.deliver(role); },
                  [promise](caf::error& e) mutable { promise.deliver(std::move(e)); });
        return promise;
      },
      [self](subscribe_atom, const caf::actor& subscriber) {
        if (!from_this_process(self) || !subscriber) return;
        self->state.subscribers.push_back(subscriber);
        for (const auto& [name, entry] : self->state.nodes)
          if (entry.info.alive) caf::anon_send(subscriber, node_up_atom::value, entry.info);
      },
      [self](shutdown_atom, const std::string& reason) {
        if (!from_this_process(self)) return;
        for (auto& [name, entry] : self->state.nodes)
          if (entry.info.alive) self->send(entry.spawner, shutdown_atom::value, reason);
      },
  };
}

}  // namespace

head_actor spawn_registry(caf::actor_system& system, std::string secret) {
  return system.spawn(registry, std::move(secret));
}

}  // namespace moerl::cluster
