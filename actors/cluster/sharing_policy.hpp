// The scheduler of cluster processes: CAF's work sharing (one queue, idle workers wait on a condition
// variable), with the condition variable signalled after the queue's lock is released, and (with
// moerl.idle-spin-us > 0) one idle worker at a time polling the queue for that long before it waits.
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>

#include <caf/policy/work_sharing.hpp>
#include <caf/policy/work_stealing.hpp>
#include <caf/resumable.hpp>
#include <caf/scheduler/coordinator.hpp>

#include "actors/cluster/quiet_clock.hpp"

namespace moerl::cluster {

// CAF 0.17's work_sharing::enqueue signals while it holds the queue's lock. On a loaded machine the woken worker
// often runs at once on the same core, finds the lock taken, and blocks on it until the enqueuing thread runs
// again and releases it: two context switches more per hand-off (each ~10-15 us of CPU on the 2-core VM).
// Signalling after the unlock is the usual condition-variable pattern (the worker re-checks the queue under the
// lock, so no wake-up is lost). Measured over 10 alternating pairs of `moerl bench actors` runs under load 6-8
// on the 2-core VM: 15-25% fewer context switches in every pair, the remote round trip faster in 9 of 10
// (medians of the two sets 175 -> 160 us and 178 -> 165 us).
// A spin-wait hint to the core (the pause instruction on x86): the polling thread yields the core's pipeline to
// its sibling hyperthread and uses less power.
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

class SignalAfterUnlockSharing : public caf::policy::work_sharing {
 public:
  template <class Coordinator>
  void enqueue(Coordinator* self, caf::resumable* job) {
    auto& data = d(self);
    queue_type one;  // allocated outside the lock, as CAF does
    one.push_back(job);
    {
      std::lock_guard<std::mutex> guard(data.lock);
      data.queue.splice(data.queue.end(), one);
    }
    data.cv.notify_one();
  }
  // work_sharing's other enqueue paths call its own enqueue: each is redefined to call the one above.
  template <class Coordinator>
  void central_enqueue(Coordinator* self, caf::resumable* job) {
    enqueue(self, job);
  }
  template <class Worker>
  void external_enqueue(Worker* self, caf::resumable* job) {
    enqueue(self->parent(), job);
  }
  template <class Worker>
  void internal_enqueue(Worker* self, caf::resumable* job) {
    enqueue(self->parent(), job);
  }
  template <class Worker>
  void resume_job_later(Worker* self, caf::resumable* job) {
    enqueue(self->parent(), job);
  }
  // The next job: polled for the coordinator's idle spin by one worker at a time, then waited for as CAF does.
  template <class Worker>
  caf::resumable* dequeue(Worker* self);
};

// Work sharing with the quiet clock and the idle spin (moerl.idle-spin-us, read once from the config).
//
// Why one polling worker: a job enqueued for a worker that waits on the condition variable waits for the kernel
// to wake that worker and schedule it, tens of microseconds on an idle host whose cores sleep in deep C-states
// (twice per round trip between two processes: the request in one, the answer in the other). A worker that is
// still polling takes it at once. One poller is enough for the latency of a chain of requests and bounds the
// CPU that idle polling burns to one core for at most the spin after the last job; the other idle workers wait
// on the condition variable as in CAF and are signalled by every enqueue (so a burst still runs in parallel).
class SharingCoordinator : public QuietClockCoordinator<SignalAfterUnlockSharing> {
 public:
  explicit SharingCoordinator(caf::actor_system& sys);
  std::chrono::microseconds idle_spin() const { return spin_; }
  // True when no other worker polls; the caller polls, then calls release_poller().
  bool claim_poller() { return !polling_.exchange(true, std::memory_order_acquire); }
  void release_poller() { polling_.store(false, std::memory_order_release); }

 private:
  std::chrono::microseconds spin_{0};
  std::atomic<bool> polling_{false};
};

template <class Worker>
caf::resumable* SignalAfterUnlockSharing::dequeue(Worker* self) {
  auto* parent = static_cast<SharingCoordinator*>(self->parent());
  auto& data = d(parent);
  auto pop = [&data] {
    caf::resumable* job = data.queue.front();
    data.queue.pop_front();
    return job;
  };
  if (parent->idle_spin().count() > 0 && parent->claim_poller()) {
    using Clock = std::chrono::steady_clock;
    const Clock::time_point until = Clock::now() + parent->idle_spin();
    do {
      // A try_lock every ~100 pause instructions (~1-3 us): the enqueuing threads rarely find the lock taken.
      for (int i = 0; i < 100; ++i) cpu_relax();
      std::unique_lock<std::mutex> guard(data.lock, std::try_to_lock);
      if (guard.owns_lock() && !data.queue.empty()) {
        parent->release_poller();
        return pop();
      }
    } while (Clock::now() < until);
    parent->release_poller();
  }
  std::unique_lock<std::mutex> guard(data.lock);
  data.cv.wait(guard, [&] { return !data.queue.empty(); });
  return pop();
}
using StealingCoordinator = QuietClockCoordinator<caf::policy::work_stealing>;

}  // namespace moerl::cluster
