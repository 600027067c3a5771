#include "actors/cluster/spawner.hpp"

#include <unistd.h>

#include <cstdio>
#include <ctime>
#include <memory>

#include "actors/cluster/auth.hpp"

namespace moerl::cluster {

void log_line(const std::string& text) {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  tm local{};
  localtime_r(&ts.tv_sec, &local);
  std::fprintf(stderr, "[%02d:%02d:%02d.%03ld] %s\n", local.tm_hour, local.tm_min, local.tm_sec,
               ts.tv_nsec / 1000000, text.c_str());
}

namespace {

struct SpawnerState {
  SpawnerState() = default;  // not an aggregate: CAF would construct it from the actor pointer
  RoleCatalog catalog;
  std::string name;
  caf::node_id head_node;
  caf::actor watch;
  ShutdownHook on_shutdown;
  // Shared with the exit functor, which stops the roles however the spawner ends (shutdown, lost head, an
  // exit message on a signal): a role left running would keep the process alive.
  std::shared_ptr<std::vector<caf::actor>> roles = std::make_shared<std::vector<caf::actor>>();
  bool ended = false;
};

using spawner_pointer = spawner_actor::stateful_pointer<SpawnerState>;

void end(spawner_pointer self, const std::string& reason, bool lost) {
  auto& st = self->state;
  if (st.ended) return;
  st.ended = true;
  if (st.on_shutdown) st.on_shutdown(reason, lost);
  self->quit();
}

bool from_head(spawner_pointer self) {
  const caf::strong_actor_ptr& sender = self->current_sender();
  return sender != nullptr && sender->node() == self->state.head_node;
}

spawner_actor::behavior_type spawner(spawner_pointer self, RoleCatalog catalog, std::string name,
                                     caf::node_id head_node, caf::actor watch, ShutdownHook on_shutdown) {
  auto& st = self->state;
  st.catalog = std::move(catalog);
  st.name = std::move(name);
  st.head_node = head_node;
  st.watch = watch;
  st.on_shutdown = std::move(on_shutdown);
  self->attach_functor([roles = st.roles] {
    for (const caf::actor& role : *roles) caf::anon_send_exit(role, caf::exit_reason::user_shutdown);
  });
  if (watch) {
    self->monitor(watch);
    self->set_down_handler([self](caf::down_msg& dm) {
      if (dm.source == self->state.watch.address())
        end(self, "lost the head (" + describe(dm.reason) + ")", true);
    });
  }
  return {
      [self](spawn_atom, const RoleSpec& spec) -> caf::result<caf::actor> {
        if (!from_head(self)) {
          log_line("moerl node " + self->state.name + ": refused to start role " + spec.name +
                   ": the request did not come from the head");
          return make_cluster_error("node " + self->state.name + ": only the head may start roles");
        }
        auto role = self->state.catalog.spawn(self->system(), spec);
        if (!role) {
          log_line("moerl node " + self->state.name + ": " + describe(role.error()));
          return role.error();
        }
        self->state.roles->push_back(*role);
        log_line("moerl node " + self->state.name + ": started role " + spec.name + " (" + spec.kind + ")");
        return *role;
      },
      [self](shutdown_atom, const std::string& reason) {
        if (!from_head(self)) return;
        end(self, "the head ended the cluster (" + reason + ")", false);
      },
  };
}

}  // namespace

spawner_actor spawn_spawner(caf::actor_system& system, RoleCatalog catalog, std::string name, caf::node_id head_node,
                            caf::actor watch, ShutdownHook on_shutdown) {
  return system.spawn(spawner, std::move(catalog), std::move(name), head_node, std::move(watch),
                      std::move(on_shutdown));
}

NodeResources local_resources(const RoleCatalog& catalog) {
  NodeResources r;
  char host[256] = {};
  if (gethostname(host, sizeof host - 1) == 0) r.host = host;
  r.pid = static_cast<int32_t>(getpid());
  r.cpus = static_cast<int32_t>(sysconf(_SC_NPROCESSORS_ONLN));
  r.memory_bytes = static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<int64_t>(sysconf(_SC_PAGESIZE));
  r.kinds = catalog.kinds();
  return r;
}

caf::expected<std::string> join_cluster(caf::actor_system& system, const head_actor& head, const std::string& secret,
                                        const std::string& name, const NodeResources& resources,
                                        const spawner_actor& spawner, std::chrono::milliseconds timeout) {
  caf::scoped_actor self{system};
  NodeHello hello;
  hello.name = name;
  hello.nonce = random_bytes(kNonceBytes);
  caf::expected<std::string> outcome = make_cluster_error("no answer");
  Challenge challenge;
  bool answered = false;
  self->request(head, timeout, hello_atom::value, hello)
      .receive([&](const Challenge& c) { challenge = c, answered = true; },
               [&](caf::error& e) { outcome = std::move(e); });
  if (!answered) return outcome;
  const Bytes expected = handshake_proof(secret, "moerl-head", name, hello.nonce, challenge.nonce);
  const bool head_knows_secret = equal_in_constant_time(expected, challenge.proof);
  JoinRequest join;
  join.session = challenge.session;
  // A head that failed its proof gets an empty proof: the join is refused there too, so both sides log the
  // wrong secret, and a possible impostor learns nothing from this node.
  if (head_knows_secret) join.proof = handshake_proof(secret, "moerl-node", name, challenge.nonce, hello.nonce);
  join.resources = resources;
  self->request(head, timeout, join_atom::value, join, caf::actor_cast<caf::actor>(spawner))
      .receive([&](const std::string& registered) { outcome = registered; },
               [&](caf::error& e) { outcome = std::move(e); });
  if (!head_knows_secret)
    return make_cluster_error("wrong secret: the head's proof of the cluster secret did not match this node's "
                              "secret (or it is not a moerl head of this cluster)");
  return outcome;
}

}  // namespace moerl::cluster
