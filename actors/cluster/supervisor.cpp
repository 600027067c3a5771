#include "actors/cluster/supervisor.hpp"

#include <algorithm>
#include <map>
#include <set>

#include "actors/cluster/spawner.hpp"

namespace moerl::cluster {
namespace {

using RolePromise = caf::typed_response_promise<caf::actor, uint32_t>;

struct RoleRecord {
  uint64_t id = 0;                 // unique per placement: a late answer for a retired record is recognised
  RoleSpec spec;
  caf::actor handle;               // the current incarnation while up
  std::string node;                // where it runs (or last ran)
  uint32_t incarnation = 0;        // 1 for the first start, +1 per restart
  bool up = false;
  bool starting = false;           // wants to run: a start is in flight or scheduled
  bool spawn_in_flight = false;
  bool failed = false;
  uint32_t restarts = 0, attempts = 0;
  std::set<std::string> avoid;     // nodes where this incarnation failed to start, or where it died with its node
  std::vector<RolePromise> waiting;
};

struct SupervisorState {
  SupervisorState() = default;  // not an aggregate: CAF would construct it from the actor pointer
  head_actor registry;
  SupervisorOptions options;
  std::map<std::string, NodeInfo> nodes;
  std::map<std::string, RoleRecord> roles;
  std::vector<caf::actor> subscribers;
  uint64_t next_id = 1;
  bool stopped = false;
};

using supervisor_pointer = supervisor_actor::stateful_pointer<SupervisorState>;

bool offers(const NodeInfo& node, const std::string& kind) {
  return node.alive && std::find(node.resources.kinds.begin(), node.resources.kinds.end(), kind) !=
                           node.resources.kinds.end();
}

// The node for the next incarnation of `rec`, or "" when none can take it now.
std::string choose_node(const SupervisorState& st, const RoleRecord& rec) {
  const bool relaxed = rec.attempts > 3;  // a node avoided after a transient failure may be tried again
  auto usable = [&](const NodeInfo& n) { return offers(n, rec.spec.kind) && (relaxed || !rec.avoid.count(n.name)); };
  if (!rec.spec.node.empty()) {
    const auto it = st.nodes.find(rec.spec.node);
    if (it != st.nodes.end() && usable(it->second)) return it->second.name;
    // The first start waits for the placement's node to join; a restart moves to a surviving node.
    if (rec.incarnation == 0 && (it == st.nodes.end() || it->second.alive)) return "";
  }
  std::string best;
  size_t best_load = 0;
  for (const auto& [name, node] : st.nodes) {
    if (!usable(node)) continue;
    size_t load = 0;
    for (const auto& [other, r] : st.roles) load += (r.up || r.spawn_in_flight) && r.node == name;
    if (best.empty() || load < best_load) best = name, best_load = load;
  }
  return best;
}

template <class... Ts>
void notify(supervisor_pointer self, const Ts&... event) {
  for (const caf::actor& s : self->state.subscribers) caf::anon_send(s, event...);
}

void fail(supervisor_pointer self, RoleRecord& rec, const std::string& reason) {
  rec.failed = true;
  rec.starting = false;
  log_line("moerl head: role " + rec.spec.name + " failed for good: " + reason);
  for (auto& p : rec.waiting) p.deliver(make_cluster_error("role " + rec.spec.name + " failed: " + reason));
  rec.waiting.clear();
  notify(self, role_fail_atom::value, rec.spec.name, reason);
}

void start(supervisor_pointer self, const std::string& name);

void schedule_retry(supervisor_pointer self, RoleRecord& rec) {
  if (++rec.attempts > self->state.options.max_start_attempts) {
    fail(self, rec, "no node could start it after " + std::to_string(rec.attempts - 1) + " attempts");
    return;
  }
  self->delayed_send(self, self->state.options.retry_delay, retry_atom::value, rec.spec.name);
}

void start(supervisor_pointer self, const std::string& name) {
  auto& st = self->state;
  const auto it = st.roles.find(name);
  if (it == st.roles.end() || st.stopped) return;
  RoleRecord& rec = it->second;
  if (!rec.starting || rec.spawn_in_flight || rec.up || rec.failed) return;
  const std::string node = choose_node(st, rec);
  if (node.empty()) {
    schedule_retry(self, rec);
    return;
  }
  rec.spawn_in_flight = true;
  rec.node = node;
  const uint64_t id = rec.id;
  self->request(st.registry, st.options.spawn_timeout, spawn_atom::value, node, rec.spec)
      .then(
          [self, name, node, id](const caf::actor& role) {
            auto& st = self->state;
            const auto it = st.roles.find(name);
            if (it == st.roles.end() || it->second.id != id || st.stopped) {  // retired or stopped meanwhile
              caf::anon_send_exit(role, caf::exit_reason::user_shutdown);
              return;
            }
            RoleRecord& rec = it->second;
            rec.spawn_in_flight = rec.starting = false;
            rec.up = true;
            rec.handle = role;
            rec.node = node;
            rec.attempts = 0;
            rec.avoid.clear();
            ++rec.incarnation;
            self->monitor(role);
            log_line("moerl head: role " + name + " (" + rec.spec.kind + ") up on node '" + node + "'" +
                     (rec.incarnation > 1 ? " (restart " + std::to_string(rec.incarnation - 1) + ")" : ""));
            for (auto& p : rec.waiting) p.deliver(role, rec.incarnation);
            rec.waiting.clear();
            notify(self, role_up_atom::value, name, role, rec.incarnation, node);
          },
          [self, name, node, id](caf::error& e) {
            auto& st = self->state;
            const auto it = st.roles.find(name);
            if (it == st.roles.end() || it->second.id != id || st.stopped) return;
            RoleRecord& rec = it->second;
            rec.spawn_in_flight = false;
            rec.avoid.insert(node);
            log_line("moerl head: could not start role " + name + " on node '" + node + "': " + describe(e));
            schedule_retry(self, rec);
          });
}

supervisor_actor::behavior_type supervisor(supervisor_pointer self, head_actor registry, SupervisorOptions options) {
  self->state.registry = registry;
  self->state.options = options;
  self->send(registry, subscribe_atom::value, caf::actor_cast<caf::actor>(self));
  self->set_down_handler([self](caf::down_msg& dm) {
    auto& st = self->state;
    for (auto& [name, rec] : st.roles) {
      if (!rec.up || rec.handle.address() != dm.source) continue;
      rec.up = false;
      rec.handle = nullptr;
      if (dm.reason == caf::exit_reason::normal) {
        log_line("moerl head: role " + name + " finished");
        return;
      }
      const std::string reason = describe(dm.reason);
      log_line("moerl head: role " + name + " on node '" + rec.node + "' died: " + reason);
      notify(self, role_down_atom::value, name, rec.incarnation, reason);
      if (rec.restarts >= st.options.max_restarts) {
        fail(self, rec, "died " + std::to_string(rec.restarts + 1) + " times; last: " + reason);
        return;
      }
      ++rec.restarts;
      if (dm.reason == caf::exit_reason::remote_link_unreachable) rec.avoid.insert(rec.node);
      rec.starting = true;
      start(self, name);
      return;
    }
  });
  return {
      [self](place_atom, const RoleSpec& spec) -> caf::result<caf::actor, uint32_t> {
        auto& st = self->state;
        if (!valid_role_name(spec.name)) return make_cluster_error("role name \"" + spec.name + "\" is not valid");
        if (st.stopped) return make_cluster_error("the supervisor has stopped");
        auto it = st.roles.find(spec.name);
        if (it == st.roles.end()) {
          RoleRecord rec;
          rec.id = st.next_id++;
          rec.spec = spec;
          rec.starting = true;
          it = st.roles.emplace(spec.name, std::move(rec)).first;
          auto promise = self->make_response_promise<caf::actor, uint32_t>();
          it->second.waiting.push_back(promise);
          start(self, spec.name);
          return promise;
        }
        RoleRecord& rec = it->second;
        if (rec.spec.kind != spec.kind || rec.spec.config != spec.config)
          return make_cluster_error("role " + spec.name + " is already placed with another kind or config");
        if (rec.failed) return make_cluster_error("role " + spec.name + " has failed");
        if (rec.up) return caf::result<caf::actor, uint32_t>(rec.handle, rec.incarnation);
        auto promise = self->make_response_promise<caf::actor, uint32_t>();
        rec.waiting.push_back(promise);
        return promise;
      },
      [self](lookup_atom, const std::string& name) -> caf::result<caf::actor, uint32_t> {
        auto& st = self->state;
        const auto it = st.roles.find(name);
        if (it == st.roles.end()) return make_cluster_error("no role named " + name);
        RoleRecord& rec = it->second;
        if (rec.failed) return make_cluster_error("role " + name + " has failed");
        if (rec.up) return caf::result<caf::actor, uint32_t>(rec.handle, rec.incarnation);
        if (!rec.starting) return make_cluster_error("role " + name + " has finished");
        auto promise = self->make_response_promise<caf::actor, uint32_t>();
        rec.waiting.push_back(promise);
        return promise;
      },
      [self](subscribe_atom, const caf::actor& subscriber) {
        if (subscriber) self->state.subscribers.push_back(subscriber);
      },
      [self](retire_atom, const std::string& name) -> bool {
        auto& st = self->state;
        const auto it = st.roles.find(name);
        if (it == st.roles.end()) return false;
        RoleRecord& rec = it->second;
        const bool was_up = rec.up;
        if (rec.up) {
          self->demonitor(rec.handle);
          caf::anon_send_exit(rec.handle, caf::exit_reason::user_shutdown);
        }
        for (auto& p : rec.waiting) p.deliver(make_cluster_error("role " + name + " was retired"));
        st.roles.erase(it);  // a start in flight finds no record and stops what it started
        return was_up;
      },
      [self](stop_atom) -> uint32_t {
        auto& st = self->state;
        st.stopped = true;
        uint32_t stopped = 0;
        for (auto& [name, rec] : st.roles) {
          if (rec.up) {
            self->demonitor(rec.handle);
            caf::anon_send_exit(rec.handle, caf::exit_reason::user_shutdown);
            ++stopped;
          }
          for (auto& p : rec.waiting) p.deliver(make_cluster_error("the run was stopped"));
        }
        st.roles.clear();
        return stopped;
      },
      [self](node_up_atom, const NodeInfo& node) {
        auto& st = self->state;
        st.nodes[node.name] = node;
        for (auto& [name, rec] : st.roles) rec.avoid.erase(node.name);  // a rejoined node is usable again
        for (auto& [name, rec] : st.roles)
          if (rec.starting) start(self, name);
      },
      [self](node_down_atom, const std::string& node, const std::string&) {
        auto it = self->state.nodes.find(node);
        if (it != self->state.nodes.end()) it->second.alive = false;
      },
      [self](retry_atom, const std::string& name) { start(self, name); },
  };
}

}  // namespace

supervisor_actor spawn_supervisor(caf::actor_system& system, head_actor registry, SupervisorOptions options) {
  return system.spawn(supervisor, std::move(registry), options);
}

}  // namespace moerl::cluster
