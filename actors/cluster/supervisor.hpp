// Supervision of a run's roles across the cluster. The supervisor (an actor in the head process) starts each
// role on the node its placement names, monitors it, and when the role dies — its actor fails, or its whole
// node process is killed or cut off — starts it again (a new incarnation) on its node if that node is still
// alive, else on another live node that offers the role's kind. A restarted role resumes by itself from its
// last checkpoint (its config says where checkpoints are); the supervisor only guarantees that a role named
// "trainer" exists somewhere, once.
//
// How a driver uses it (any CAF actor, typed or not):
//   1. subscribe_atom, driver handle: role events arrive as anonymous messages
//        (role_up_atom, name, caf::actor handle, uint32_t incarnation, std::string node)
//        (role_down_atom, name, uint32_t incarnation, std::string reason)
//        (role_fail_atom, name, std::string reason)       -- restarts exhausted or nowhere to run it
//   2. place_atom, RoleSpec -> (caf::actor, uint32_t incarnation) once the role is up (it waits for the
//      placement's node to join).
//   3. On role_down, treat requests in flight to that incarnation as lost; on role_up of the next
//      incarnation, ask the role where it stands (e.g. the last step it applied) and resume from there:
//      idempotent requests are simply sent again, training steps carry step ids so that none is applied twice.
//      lookup_atom, name -> (handle, incarnation) waits while a role restarts.
//   4. retire_atom, name -> true when a running role was stopped (its work is done; it is not restarted and
//      its name may be placed again); stop_atom -> number of roles stopped (the run is over; nothing is
//      restarted any more).
#pragma once
#include <chrono>
#include <cstdint>
#include <string>

#include <caf/all.hpp>

#include "actors/cluster/protocol.hpp"

namespace moerl::cluster {

struct SupervisorOptions {
  uint32_t max_restarts = 8;                           // per role; one more death fails the role
  std::chrono::milliseconds retry_delay{200};          // before trying another node after a failed start
  uint32_t max_start_attempts = 50;                    // per incarnation (covers waiting for a node to join)
  std::chrono::milliseconds spawn_timeout{60000};      // a start that takes longer counts as failed
};

using supervisor_actor = caf::typed_actor<
    caf::replies_to<place_atom, RoleSpec>::with<caf::actor, uint32_t>,
    caf::replies_to<lookup_atom, std::string>::with<caf::actor, uint32_t>,
    caf::reacts_to<subscribe_atom, caf::actor>,
    caf::replies_to<retire_atom, std::string>::with<bool>,
    caf::replies_to<stop_atom>::with<uint32_t>,
    // From the registry (the supervisor subscribes to it):
    caf::reacts_to<node_up_atom, NodeInfo>,
    caf::reacts_to<node_down_atom, std::string, std::string>,
    // Internal: try to start a role again.
    caf::reacts_to<retry_atom, std::string>>;

supervisor_actor spawn_supervisor(caf::actor_system& system, head_actor registry, SupervisorOptions options = {});

}  // namespace moerl::cluster
