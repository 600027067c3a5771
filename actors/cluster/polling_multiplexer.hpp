// The I/O thread of cluster processes: CAF's epoll multiplexer that, after each event, keeps polling without
// blocking for a short window (`moerl.idle-spin-us`, NetOptions::idle_spin) before it blocks in epoll_wait again.
//
// A request to an actor of another process and its answer cross the multiplexer of each process twice (the
// socket's data in, the reply handed over through CAF's pipe out). A blocked epoll_wait is woken by the kernel
// and the thread rescheduled: on an idle host whose cores sleep in deep C-states that costs tens of microseconds
// per hand-off, most of a ~150 us round trip (the H200 host's 16 idle cores). A thread that is still polling
// when the next event comes picks it up within a microsecond. The window bounds the cost: an idle process polls
// for at most that long after its last event, then uses no CPU. With 0 (the default where cores are scarce: a
// spinner there takes the core that the thread doing the work needs) it is CAF's multiplexer unchanged.
#pragma once
#include <chrono>

#include <caf/io/network/default_multiplexer.hpp>

namespace moerl::cluster {

class PollingMultiplexer : public caf::io::network::default_multiplexer {
 public:
  // Reads moerl.idle-spin-us from the system's config (0 when unset).
  explicit PollingMultiplexer(caf::actor_system* sys);
  // CAF's loop (poll until no socket handler is left), with the polling window before each blocking wait.
  void run() override;
  std::chrono::microseconds idle_spin() const { return spin_; }

 private:
  std::chrono::microseconds spin_{0};
};

}  // namespace moerl::cluster
