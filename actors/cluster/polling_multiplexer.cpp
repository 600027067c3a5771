#include "actors/cluster/polling_multiplexer.hpp"

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>

namespace moerl::cluster {

PollingMultiplexer::PollingMultiplexer(caf::actor_system* sys)
    : caf::io::network::default_multiplexer(sys),
      spin_(caf::get_or(sys->config(), "moerl.idle-spin-us", int64_t{0})) {}

void PollingMultiplexer::run() {
  using Clock = std::chrono::steady_clock;
  while (num_socket_handlers() > 0) {
    if (spin_.count() > 0) {
      // poll_once(false): one epoll_wait with a zero timeout (~1 us), then the events and posted jobs it found;
      // true when there were any. Each event restarts the window.
      bool active = false;
      const Clock::time_point until = Clock::now() + spin_;
      do active = poll_once(false);
      while (!active && Clock::now() < until);
      if (active) continue;
    }
    poll_once(true);
  }
}

}  // namespace moerl::cluster
