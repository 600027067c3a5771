// The actor clock of cluster processes: CAF's timeouts and delayed messages with a timer thread that is woken
// only when an event is due before the time it already sleeps until.
//
// CAF 0.17's clock (detail::thread_safe_actor_clock) hands every set and every cancel to its thread through a
// queue and wakes it each time: a request with a timeout that is answered costs two wake-ups of the timer thread,
// which on the 2-core VM takes a core from the threads that carry the answer (measured ~60 us of the remote round
// trip). Here the schedule lives under a mutex, the caller applies its change itself, and the thread is signalled
// only for an event due sooner than its next wake-up. A cancel never signals (a sleeping thread that wakes for an
// event that is gone finds nothing due and sleeps again), and a request timeout is almost always due after the
// one the thread already waits for (timeouts of seconds, set in order), so a steady stream of requests does not
// wake it at all.
//
// It derives from thread_safe_actor_clock only because caf::scheduler::coordinator::clock() returns that type; none
// of the base's queue or thread is used: the schedule is simple_actor_clock's (same events, same delivery).
#pragma once
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>

#include <caf/all.hpp>
#include <caf/detail/thread_safe_actor_clock.hpp>
#include <caf/scheduler/coordinator.hpp>

namespace moerl::cluster {

class QuietActorClock : public caf::detail::thread_safe_actor_clock {
 public:
  ~QuietActorClock() override;

  void set_ordinary_timeout(time_point t, caf::abstract_actor* self, caf::atom_value type, uint64_t id) override;
  void set_multi_timeout(time_point t, caf::abstract_actor* self, caf::atom_value type, uint64_t id) override;
  void set_request_timeout(time_point t, caf::abstract_actor* self, caf::message_id id) override;
  void cancel_ordinary_timeout(caf::abstract_actor* self, caf::atom_value type) override;
  void cancel_request_timeout(caf::abstract_actor* self, caf::message_id id) override;
  void cancel_timeouts(caf::abstract_actor* self) override;
  void schedule_message(time_point t, caf::strong_actor_ptr receiver, caf::mailbox_element_ptr content) override;
  void schedule_message(time_point t, caf::group target, caf::strong_actor_ptr sender,
                        caf::message content) override;
  void cancel_all() override;

  // The timer thread: started before the scheduler's workers, stopped after them (pending events are dropped).
  void start();
  void stop();

  // How often the timer thread has been signalled since start (tests: a stream of answered requests must not).
  uint64_t signals() const;

 private:
  // Runs `change` on the schedule under the lock; signals the thread when an event is now due before wake_at_.
  template <class Change>
  void apply(time_point due, Change&& change);
  template <class Change>
  void apply(Change&& change);
  void run();

  mutable std::mutex mu_;
  std::condition_variable cv_;
  time_point wake_at_ = time_point::max();  // when the thread wakes next (max: only when signalled)
  bool stopping_ = false;
  uint64_t signals_ = 0;
  std::thread thread_;
};

// A CAF scheduler (Policy: work sharing or stealing) whose actors use a QuietActorClock.
template <class Policy>
class QuietClockCoordinator : public caf::scheduler::coordinator<Policy> {
 public:
  using caf::scheduler::coordinator<Policy>::coordinator;
  caf::detail::thread_safe_actor_clock& clock() noexcept override { return quiet_; }
  QuietActorClock& quiet_clock() noexcept { return quiet_; }

 protected:
  void start() override {
    quiet_.start();
    caf::scheduler::coordinator<Policy>::start();
  }
  void stop() override {
    caf::scheduler::coordinator<Policy>::stop();
    quiet_.stop();
  }

 private:
  QuietActorClock quiet_;
};

}  // namespace moerl::cluster
