// A cluster process's actor system (actors/cluster/system): the CAF settings that cut the latency of a request
// between processes (polling after activity included), and that remote messages still arrive as they were sent.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

#include <sys/resource.h>

#include "actors/cluster/polling_multiplexer.hpp"
#include "actors/cluster/quiet_clock.hpp"
#include "actors/cluster/sharing_policy.hpp"
#include "actors/cluster/system.hpp"
#include "runtime/error.hpp"

namespace moerl::cluster {
namespace {

using namespace std::chrono_literals;
using count_atom = caf::atom_constant<caf::atom("count")>;

size_t setting(ClusterSystem& c, const char* key) {
  return caf::get_or(c.system().config(), key, size_t{12345});
}

TEST(ClusterSystem, DeserializesReceivedMessagesOnTheMultiplexerThread) {
  // middleman.workers = 0: no hand-off to a scheduler job per received message (one wake-up less per message).
  ClusterSystem sharing{NetOptions{}};
  EXPECT_EQ(setting(sharing, "middleman.workers"), 0u);
  EXPECT_EQ(caf::get_or(sharing.system().config(), "scheduler.policy", caf::atom("none")), caf::atom("sharing"));
  NetOptions net;
  net.scheduler = "stealing";
  ClusterSystem stealing{net};
  EXPECT_EQ(setting(stealing, "middleman.workers"), 0u);
}

TEST(ClusterSystem, SharingWorkersAreSignalledOutsideTheQueuesLock) {
  ClusterSystem c{NetOptions{}};
  EXPECT_NE(dynamic_cast<SharingCoordinator*>(&c.system().scheduler()), nullptr);
}

using hop_atom = caf::atom_constant<caf::atom("hop")>;
using total_atom = caf::atom_constant<caf::atom("total")>;

struct RelayState {
  caf::actor next;
  uint64_t seen = 0;
};

// Tokens circle a ring of actors (enqueues from workers) while two plain threads send to the same actors
// (enqueues from outside): a lost wake-up would leave a message unhandled and the count short.
void expect_every_job_runs(const NetOptions& net) {
  ClusterSystem c{net};
  caf::actor_system& sys = c.system();
  constexpr int kActors = 8, kTokens = 4, kExternal = 5000;
  constexpr uint64_t kHops = 2000;
  auto relay = [](caf::stateful_actor<RelayState>* self) -> caf::behavior {
    return {[self](caf::actor next) { self->state.next = std::move(next); },
            [self](hop_atom, uint64_t left) {
              ++self->state.seen;
              if (left > 0) self->send(self->state.next, hop_atom::value, left - 1);
            },
            [self](total_atom) { return self->state.seen; }};
  };
  std::vector<caf::actor> ring;
  for (int i = 0; i < kActors; ++i) ring.push_back(sys.spawn(relay));
  for (int i = 0; i < kActors; ++i) caf::anon_send(ring[i], ring[(i + 1) % kActors]);
  for (int t = 0; t < kTokens; ++t) caf::anon_send(ring[t], hop_atom::value, kHops);
  std::vector<std::thread> senders;
  for (int t = 0; t < 2; ++t)
    senders.emplace_back([&ring] {
      for (int i = 0; i < kExternal; ++i) caf::anon_send(ring[i % kActors], hop_atom::value, uint64_t{0});
    });
  for (auto& s : senders) s.join();
  const uint64_t expected = kTokens * (kHops + 1) + 2 * kExternal;
  caf::scoped_actor self{sys};
  uint64_t total = 0;
  for (int round = 0; round < 300 && total < expected; ++round) {
    total = 0;
    for (auto& a : ring)
      self->request(a, 10s, total_atom::value)
          .receive([&](uint64_t n) { total += n; }, [](caf::error& e) { ADD_FAILURE() << describe(e); });
    if (total < expected) std::this_thread::sleep_for(10ms);
  }
  EXPECT_EQ(total, expected);
  for (auto& a : ring) caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
}

NetOptions polling(std::chrono::microseconds spin) {
  NetOptions net;
  net.idle_spin = spin;
  return net;
}

TEST(ClusterSystem, SharingSchedulerRunsEveryJobEnqueuedFromWorkersAndOtherThreads) {
  expect_every_job_runs(polling(0us));
}

TEST(ClusterSystem, SharingSchedulerWithAPollingWorkerRunsEveryJob) {
  // The polling worker takes jobs without the condition variable; the others still wait on it: nothing is lost
  // between the two paths (a long window, so that the poller is active throughout).
  expect_every_job_runs(polling(5000us));
}

TEST(ClusterSystem, AnIdleSpinPollsTheIOThreadAndOneWorker) {
  ClusterSystem c{polling(150us)};
  auto* mpx = dynamic_cast<PollingMultiplexer*>(&c.system().middleman().backend());
  ASSERT_NE(mpx, nullptr);
  EXPECT_EQ(mpx->idle_spin(), 150us);
  auto* sched = dynamic_cast<SharingCoordinator*>(&c.system().scheduler());
  ASSERT_NE(sched, nullptr);
  EXPECT_EQ(sched->idle_spin(), 150us);
  ClusterSystem quiet{polling(0us)};
  EXPECT_EQ(dynamic_cast<PollingMultiplexer&>(quiet.system().middleman().backend()).idle_spin(), 0us);
}

TEST(ClusterSystem, RefusesAnIdleSpinOutsideItsRange) {
  EXPECT_THROW(ClusterSystem{polling(-1us)}, Error);
  EXPECT_THROW(ClusterSystem{polling(200000us)}, Error);
}

double process_cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         1e-6 * static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

TEST(ClusterSystem, PollingStopsWhenTheSystemIsIdle) {
  // The window is spent after the last event: an idle system's pollers block like CAF's threads. Polling for
  // ever would burn 2 threads x 0.4 s of CPU in the 0.4 s measured; blocked threads burn ~0 (bound 0.1 s: timer
  // and scheduler noise on a loaded machine).
  ClusterSystem c{polling(2000us)};
  caf::scoped_actor self{c.system()};
  auto echo = c.system().spawn([]() -> caf::behavior { return {[](uint64_t x) { return x; }}; });
  for (uint64_t i = 0; i < 100; ++i) self->request(echo, 10s, i).receive([](uint64_t) {}, [](caf::error&) {});
  std::this_thread::sleep_for(50ms);  // the windows end 2 ms after the last job
  const double before = process_cpu_seconds();
  std::this_thread::sleep_for(400ms);
  EXPECT_LT(process_cpu_seconds() - before, 0.1);
  caf::anon_send_exit(echo, caf::exit_reason::user_shutdown);
}

TEST(ClusterSystem, StealingWorkersGoFromPollingStraightToASignalledWait) {
  // CAF's 500 polls with an uninterrupted 50 us sleep between them are skipped; the short poll stays.
  NetOptions net;
  net.scheduler = "stealing";
  ClusterSystem c{net};
  EXPECT_EQ(setting(c, "work-stealing.moderate-poll-attempts"), 0u);
  EXPECT_EQ(caf::get_or(c.system().config(), "scheduler.policy", caf::atom("none")), caf::atom("stealing"));
}

TEST(ClusterSystem, RefusesAnUnknownScheduler) {
  NetOptions net;
  net.scheduler = "fastest";
  EXPECT_THROW(ClusterSystem{net}, Error);
}

struct SinkState {
  uint64_t received = 0;
  bool in_order = true;
};

TEST(ClusterSystem, MessagesDecodedOnTheMultiplexerArriveInTheOrderTheyWereSent) {
  // Without middleman workers nothing reorders what one sender sends over one connection. The head polls after
  // activity (its I/O thread and a worker take the events without blocking), the node does not.
  ClusterSystem head{polling(200us)}, node{polling(0us)};
  const caf::actor sink = node.system().spawn([](caf::stateful_actor<SinkState>* self) -> caf::behavior {
    return {[self](uint64_t x) {
              auto& st = self->state;
              st.in_order = st.in_order && x == st.received;
              ++st.received;
            },
            [self](count_atom) { return caf::make_message(self->state.received, self->state.in_order); }};
  });
  auto port = node.system().middleman().publish(sink, 0, "127.0.0.1", true);
  ASSERT_TRUE(port) << describe(port.error());
  auto remote = head.system().middleman().remote_actor("127.0.0.1", *port);
  ASSERT_TRUE(remote) << describe(remote.error());
  static constexpr uint64_t kMessages = 5000;
  caf::scoped_actor self{head.system()};
  for (uint64_t i = 0; i < kMessages; ++i) self->send(*remote, i);
  self->request(*remote, 30s, count_atom::value)
      .receive(
          [](uint64_t received, bool in_order) {
            EXPECT_EQ(received, kMessages);
            EXPECT_TRUE(in_order);
          },
          [](caf::error& e) { ADD_FAILURE() << describe(e); });
  caf::anon_send_exit(sink, caf::exit_reason::user_shutdown);
}

using echo_atom = caf::atom_constant<caf::atom("echo")>;
using hold_atom = caf::atom_constant<caf::atom("hold")>;

// An actor that answers echo at once and never answers hold (it keeps the promise, so the request stays open).
caf::behavior echo_or_hold(caf::stateful_actor<std::vector<caf::response_promise>>* self) {
  return {[](echo_atom, uint64_t x) { return x; },
          [self](hold_atom) -> caf::response_promise {
            self->state.push_back(self->make_response_promise());
            return self->state.back();
          }};
}

QuietActorClock& quiet_clock(ClusterSystem& c) {
  if (auto* s = dynamic_cast<SharingCoordinator*>(&c.system().scheduler())) return s->quiet_clock();
  if (auto* s = dynamic_cast<StealingCoordinator*>(&c.system().scheduler())) return s->quiet_clock();
  throw Error("the cluster system's scheduler has no quiet clock");
}

class QuietClock : public ::testing::TestWithParam<const char*> {
 protected:
  NetOptions options() const {
    NetOptions net;
    net.scheduler = GetParam();
    return net;
  }
};

TEST_P(QuietClock, ARequestWithoutAnAnswerTimesOutAndAnAnsweredOneDoesNot) {
  ClusterSystem c{options()};
  const caf::actor a = c.system().spawn(echo_or_hold);
  caf::scoped_actor self{c.system()};
  const auto t0 = std::chrono::steady_clock::now();
  bool timed_out = false;
  self->request(a, 50ms, hold_atom::value)
      .receive([](caf::message&) { ADD_FAILURE() << "hold was answered"; },
               [&](caf::error& e) { timed_out = e == caf::sec::request_timeout; });
  const auto waited = std::chrono::steady_clock::now() - t0;
  EXPECT_TRUE(timed_out);
  EXPECT_GE(waited, 50ms);
  EXPECT_LT(waited, 5s);  // due at 50 ms; a lost signal would leave the request open for good
  // Answered requests: their timeouts (long) are cancelled, nothing arrives for them later.
  for (uint64_t i = 0; i < 100; ++i)
    self->request(a, 60s, echo_atom::value, i)
        .receive([&](uint64_t x) { EXPECT_EQ(x, i); }, [](caf::error& e) { ADD_FAILURE() << describe(e); });
  bool stray = false;
  self->receive([&](caf::message&) { stray = true; }, caf::after(100ms) >> [] {});
  EXPECT_FALSE(stray);
  caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
}

TEST_P(QuietClock, DelayedMessagesArriveInTheOrderOfTheirDueTimes) {
  // Sent latest-due first: each one is due before the time the timer thread sleeps until, so each must signal it.
  ClusterSystem c{options()};
  caf::scoped_actor self{c.system()};
  for (int ms : {120, 80, 40, 10}) self->delayed_send(self, std::chrono::milliseconds(ms), ms);
  std::vector<int> order;
  for (int i = 0; i < 4; ++i)
    self->receive([&](int ms) { order.push_back(ms); }, caf::after(5s) >> [] { ADD_FAILURE() << "a message is late"; });
  EXPECT_EQ(order, (std::vector<int>{10, 40, 80, 120}));
}

TEST_P(QuietClock, AStreamOfAnsweredRequestsDoesNotWakeTheTimerThread) {
  // The point of the quiet clock: request timeouts set in order are due after the one the timer thread already
  // sleeps until, and cancels never signal, so 2000 answered requests signal it at most once (the first).
  ClusterSystem c{options()};
  const caf::actor a = c.system().spawn(echo_or_hold);
  caf::scoped_actor self{c.system()};
  self->request(a, 10s, echo_atom::value, uint64_t{0}).receive([](uint64_t) {}, [](caf::error&) {});
  const uint64_t before = quiet_clock(c).signals();
  for (uint64_t i = 0; i < 2000; ++i)
    self->request(a, 10s, echo_atom::value, i).receive([](uint64_t) {}, [](caf::error& e) { ADD_FAILURE() << describe(e); });
  EXPECT_LE(quiet_clock(c).signals() - before, 1u);
  caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
}

INSTANTIATE_TEST_SUITE_P(Schedulers, QuietClock, ::testing::Values("sharing", "stealing"));

}  // namespace
}  // namespace moerl::cluster
