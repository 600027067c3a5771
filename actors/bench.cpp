#include "actors/bench.hpp"

#include <algorithm>
#include <chrono>
#include <vector>

#include "actors/envelope.hpp"

namespace moerl::actors {
namespace {

using Clock = std::chrono::steady_clock;
using echo_atom = caf::atom_constant<caf::atom("echo")>;
using tick_atom = caf::atom_constant<caf::atom("tick")>;
using count_atom = caf::atom_constant<caf::atom("count")>;

using echo_actor = caf::typed_actor<caf::replies_to<echo_atom, Envelope>::with<Envelope>>;
using counter_actor = caf::typed_actor<caf::reacts_to<tick_atom, uint64_t>, caf::replies_to<count_atom>::with<uint64_t>>;

echo_actor::behavior_type echo() {
  return {[](echo_atom, Envelope& e) { return std::move(e); }};
}

struct CounterState {
  uint64_t ticks = 0;
};
counter_actor::behavior_type counter(counter_actor::stateful_pointer<CounterState> self) {
  return {[self](tick_atom, uint64_t) { ++self->state.ticks; }, [self](count_atom) { return self->state.ticks; }};
}

// Sends the next request when the previous reply arrives; answers the caller with the timings (µs).
struct PingerState {
  int left = 0;
  Clock::time_point sent;
  std::vector<double> us;
  caf::response_promise done;
};
using run_bench_atom = caf::atom_constant<caf::atom("runbench")>;

void ping(caf::stateful_actor<PingerState>* self, const echo_actor& peer, const Envelope& payload) {
  self->state.sent = Clock::now();
  self->request(peer, caf::infinite, echo_atom::value, payload).then([self, peer](Envelope& back) {
    auto& st = self->state;
    st.us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - st.sent).count());
    if (--st.left > 0)
      ping(self, peer, back);
    else
      st.done.deliver(st.us);
  });
}

caf::behavior pinger(caf::stateful_actor<PingerState>* self, echo_actor peer, Envelope payload) {
  return {[self, peer, payload](run_bench_atom, int trips) {
    self->state.left = trips;
    self->state.us.clear();
    self->state.us.reserve(static_cast<size_t>(trips));
    self->state.done = self->make_response_promise();
    ping(self, peer, payload);
    return self->state.done;
  }};
}

double median(std::vector<double> v) {
  std::nth_element(v.begin(), v.begin() + static_cast<long>(v.size() / 2), v.end());
  return v[v.size() / 2];
}

}  // namespace

double roundtrip_local_us(int trips, int warmup, int payload_bytes) {
  require(trips > 0 && warmup >= 0 && payload_bytes >= 0, "roundtrip_local_us: bad arguments");
  caf::actor_system_config config;
  add_message_types(config);
  caf::actor_system system{config};
  const Envelope payload{"TokenBatch", std::vector<uint8_t>(static_cast<size_t>(payload_bytes), 7)};
  auto peer = system.spawn(echo);
  auto driver = system.spawn(pinger, peer, payload);
  std::vector<double> us;
  caf::scoped_actor self{system};
  for (int n : {warmup, trips}) {
    if (n == 0) continue;
    self->request(driver, caf::infinite, run_bench_atom::value, n)
        .receive([&](std::vector<double>& v) { us = std::move(v); },
                 [&](caf::error& e) { throw Error("roundtrip_local_us: " + describe(e)); });
  }
  self->send_exit(driver, caf::exit_reason::user_shutdown);
  self->send_exit(peer, caf::exit_reason::user_shutdown);
  return median(us);
}

double throughput_local_msgs_per_s(int64_t messages, int runs) {
  require(messages > 0 && runs > 0, "throughput_local_msgs_per_s: bad arguments");
  caf::actor_system_config config;
  add_message_types(config);
  caf::actor_system system{config};
  std::vector<double> rates;
  caf::scoped_actor self{system};
  for (int r = 0; r < runs; ++r) {
    auto sink = system.spawn(counter);
    const auto t0 = Clock::now();
    for (int64_t i = 0; i < messages; ++i) self->send(sink, tick_atom::value, static_cast<uint64_t>(i));
    uint64_t counted = 0;
    // Mailboxes are FIFO per sender: the count is answered after every tick was handled.
    self->request(sink, caf::infinite, count_atom::value)
        .receive([&](uint64_t n) { counted = n; }, [&](caf::error& e) { throw Error("throughput: " + describe(e)); });
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    require(counted == static_cast<uint64_t>(messages), "throughput_local_msgs_per_s: messages were lost");
    rates.push_back(static_cast<double>(messages) / s);
    self->send_exit(sink, caf::exit_reason::user_shutdown);
  }
  return median(rates);
}

}  // namespace moerl::actors
