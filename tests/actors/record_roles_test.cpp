// The record-keeping roles as roles of the cluster: the supervisor on a head places a replay buffer and a
// feedback collector on a node (through the catalog, over loopback), the head's requests are acknowledged
// across the connection, and after each role is killed on its node the supervisor's restart holds every
// acknowledged record (the same folder).
#include <gtest/gtest.h>

#include <chrono>

#include "actors/cluster/catalog.hpp"
#include "actors/cluster/record_roles.hpp"
#include "actors/cluster/registry.hpp"
#include "actors/cluster/spawner.hpp"
#include "actors/cluster/supervisor.hpp"
#include "actors/cluster/system.hpp"
#include "actors/roles/feedback_collector.hpp"
#include "actors/roles/replay_buffer.hpp"
#include "tests/actors/support.hpp"

namespace moerl::cluster {
namespace {

using namespace std::chrono_literals;
using actors::testing::fresh_dir;
using actors::testing::RemoveAtExit;

msg::ReplayRecord record(uint64_t request) {
  msg::ReplayRecord r;
  r.rollout.request_id = request;
  r.rollout.prompt_ids = {1, 2, 3};
  r.rollout.response_ids = {4, 5};
  r.rollout.log_probs = {-0.5f, -1.25f};
  r.rewards = {0.0f, 1.0f};
  r.advantages = {0.5f, 0.5f};
  r.step = msg::StepId{"rl", 1};
  return r;
}

msg::Comparison comparison(int i) {
  msg::Comparison c;
  c.prompt.text = "1+" + std::to_string(i) + "=";
  c.first.text = std::to_string(1 + i);
  c.second.text = "0";
  c.choice = msg::Choice::FirstChosen;
  c.annotator = "scripted";
  c.timestamp_ns = 1700000000000000000 + i;
  return c;
}

NetOptions with_actor_types() {
  NetOptions net;
  net.register_types = [](caf::actor_system_config& cfg) { actors::add_message_types(cfg); };
  return net;
}

TEST(RecordRoles, ArePlacedOnANodeAndKeepEveryAcknowledgedRecordAcrossARestart) {
  const auto dir = fresh_dir("record-roles");
  RemoveAtExit cleanup{dir};
  const std::string secret = "an-in-process-test-secret";
  ClusterSystem head_system{with_actor_types()}, node_system{with_actor_types()};
  const head_actor registry = spawn_registry(head_system.system(), secret);
  const auto port = head_system.publish(registry, 0, "127.0.0.1");
  ASSERT_TRUE(port) << describe(port.error());
  const auto head = node_system.connect("127.0.0.1", *port);
  ASSERT_TRUE(head) << describe(head.error());
  RoleCatalog catalog;
  add_record_roles(catalog);
  const auto spawner = spawn_spawner(node_system.system(), catalog, "n1", head->node(), caf::actor_cast<caf::actor>(*head), {});
  const auto joined = join_cluster(node_system.system(), *head, secret, "n1", local_resources(catalog), spawner, 5000ms);
  ASSERT_TRUE(joined) << describe(joined.error());
  const auto supervisor = spawn_supervisor(head_system.system(), registry);

  caf::scoped_actor self{head_system.system()};
  self->send(supervisor, subscribe_atom::value, caf::actor_cast<caf::actor>(self));
  const auto place = [&](const std::string& name, const std::string& kind, const std::string& config) {
    caf::actor role;
    self->request(supervisor, 30s, place_atom::value, RoleSpec{name, kind, "n1", config})
        .receive([&](const caf::actor& a, uint32_t) { role = a; }, [&](caf::error& e) { ADD_FAILURE() << describe(e); });
    return role;
  };
  // Kills `role` on its node and returns the supervisor's restart of it.
  const auto kill_and_restarted = [&](const caf::actor& role) {
    caf::anon_send_exit(role, caf::exit_reason::kill);
    caf::actor restarted;
    for (int events = 0; events < 8 && !restarted; ++events)
      self->receive([&](role_up_atom, const std::string&, const caf::actor& a, uint32_t inc, const std::string&) {
                      if (inc > 1) restarted = a;
                    },
                    [](role_down_atom, const std::string&, uint32_t, const std::string&) {},
                    caf::after(30s) >> [] { ADD_FAILURE() << "no restart"; });
    return restarted;
  };

  auto buffer = caf::actor_cast<actors::replay_buffer_actor>(
      place("replay_buffer/0", "roles.replay_buffer", replay_buffer_config(dir / "replay", 100)));
  ASSERT_TRUE(buffer);
  for (uint64_t r = 1; r <= 10; ++r)
    self->request(buffer, 30s, actors::put_atom::value, actors::wrap(record(r)))
        .receive([&](uint64_t n) { EXPECT_EQ(n, r); }, [&](caf::error& e) { ADD_FAILURE() << describe(e); });
  buffer = caf::actor_cast<actors::replay_buffer_actor>(kill_and_restarted(caf::actor_cast<caf::actor>(buffer)));
  ASSERT_TRUE(buffer);
  self->request(buffer, 30s, actors::list_atom::value, uint64_t{0}, UINT64_MAX, uint64_t{100})
      .receive(
          [&](std::vector<actors::Envelope>& held) {
            ASSERT_EQ(held.size(), 10u);
            for (uint64_t r = 1; r <= 10; ++r)
              EXPECT_EQ(actors::unwrap<msg::ReplayRecord>(held[r - 1]), record(r));
          },
          [&](caf::error& e) { ADD_FAILURE() << describe(e); });

  auto collector = caf::actor_cast<actors::feedback_collector_actor>(
      place("feedback/0", "roles.feedback_collector", feedback_collector_config(dir / "feedback")));
  ASSERT_TRUE(collector);
  for (int i = 1; i <= 5; ++i)
    self->request(collector, 30s, actors::submit_atom::value, actors::wrap(comparison(i)))
        .receive([&](uint64_t n) { EXPECT_EQ(n, static_cast<uint64_t>(i)); },
                 [&](caf::error& e) { ADD_FAILURE() << describe(e); });
  collector = caf::actor_cast<actors::feedback_collector_actor>(kill_and_restarted(caf::actor_cast<caf::actor>(collector)));
  ASSERT_TRUE(collector);
  self->request(collector, 30s, actors::list_atom::value, std::string("Comparison"), uint64_t{0}, uint64_t{100})
      .receive([&](std::vector<actors::Envelope>& held) { EXPECT_EQ(held.size(), 5u); },
               [&](caf::error& e) { ADD_FAILURE() << describe(e); });

  // A config without a folder or a capacity is refused with a message naming the field.
  const auto no_dir = catalog.spawn(node_system.system(), RoleSpec{"replay_buffer/1", "roles.replay_buffer", "n1", "{}"});
  ASSERT_FALSE(no_dir);
  EXPECT_NE(describe(no_dir.error()).find("\"dir\""), std::string::npos) << describe(no_dir.error());
  const auto no_capacity = catalog.spawn(node_system.system(), RoleSpec{"replay_buffer/1", "roles.replay_buffer", "n1",
                                                                        replay_buffer_config(dir / "other", 0)});
  ASSERT_FALSE(no_capacity);
  EXPECT_NE(describe(no_capacity.error()).find("\"capacity\""), std::string::npos) << describe(no_capacity.error());

  caf::anon_send_exit(supervisor, caf::exit_reason::user_shutdown);
  caf::anon_send_exit(registry, caf::exit_reason::user_shutdown);
  caf::anon_send_exit(spawner, caf::exit_reason::user_shutdown);
}

}  // namespace
}  // namespace moerl::cluster
