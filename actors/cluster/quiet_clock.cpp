#include "actors/cluster/quiet_clock.hpp"

#include <utility>
#include <vector>

namespace moerl::cluster {

using simple = caf::detail::simple_actor_clock;

QuietActorClock::~QuietActorClock() { stop(); }

template <class Change>
void QuietActorClock::apply(time_point due, Change&& change) {
  bool signal = false;
  {
    std::lock_guard lock(mu_);
    change();
    if (due < wake_at_ && !stopping_) {
      wake_at_ = due;  // later events of the same burst need no second signal
      signal = true;
      ++signals_;
    }
  }
  if (signal) cv_.notify_one();
}

template <class Change>
void QuietActorClock::apply(Change&& change) {
  std::lock_guard lock(mu_);
  change();
}

void QuietActorClock::set_ordinary_timeout(time_point t, caf::abstract_actor* self, caf::atom_value type,
                                           uint64_t id) {
  apply(t, [&] { simple::set_ordinary_timeout(t, self, type, id); });
}

void QuietActorClock::set_multi_timeout(time_point t, caf::abstract_actor* self, caf::atom_value type, uint64_t id) {
  apply(t, [&] { simple::set_multi_timeout(t, self, type, id); });
}

void QuietActorClock::set_request_timeout(time_point t, caf::abstract_actor* self, caf::message_id id) {
  apply(t, [&] { simple::set_request_timeout(t, self, id); });
}

void QuietActorClock::cancel_ordinary_timeout(caf::abstract_actor* self, caf::atom_value type) {
  apply([&] { simple::cancel_ordinary_timeout(self, type); });
}

void QuietActorClock::cancel_request_timeout(caf::abstract_actor* self, caf::message_id id) {
  apply([&] { simple::cancel_request_timeout(self, id); });
}

void QuietActorClock::cancel_timeouts(caf::abstract_actor* self) {
  apply([&] { simple::cancel_timeouts(self); });
}

void QuietActorClock::schedule_message(time_point t, caf::strong_actor_ptr receiver,
                                       caf::mailbox_element_ptr content) {
  apply(t, [&] { simple::schedule_message(t, std::move(receiver), std::move(content)); });
}

void QuietActorClock::schedule_message(time_point t, caf::group target, caf::strong_actor_ptr sender,
                                       caf::message content) {
  apply(t, [&] { simple::schedule_message(t, std::move(target), std::move(sender), std::move(content)); });
}

void QuietActorClock::cancel_all() {
  apply([&] { simple::cancel_all(); });
}

void QuietActorClock::start() {
  std::lock_guard lock(mu_);
  if (thread_.joinable()) return;
  stopping_ = false;
  thread_ = std::thread([this] { run(); });
}

void QuietActorClock::stop() {
  {
    std::lock_guard lock(mu_);
    if (!thread_.joinable()) return;
    stopping_ = true;
  }
  cv_.notify_one();
  thread_.join();
  thread_ = std::thread();
  cancel_all();
}

uint64_t QuietActorClock::signals() const {
  std::lock_guard lock(mu_);
  return signals_;
}

// Ships what is due outside the lock (delivery enqueues to mailboxes, which may set or cancel timeouts of their
// own), then sleeps until the earliest event left or a signal.
void QuietActorClock::run() {
  std::vector<unique_delayed_event_ptr> due;
  std::unique_lock lock(mu_);
  while (!stopping_) {
    const time_point now = clock_type::now();
    for (auto i = schedule_.begin(); i != schedule_.end() && i->first <= now;) {
      if (i->second->backlink != actor_lookup_.end()) actor_lookup_.erase(i->second->backlink);
      due.push_back(std::move(i->second));
      i = schedule_.erase(i);
    }
    if (!due.empty()) {
      lock.unlock();
      for (auto& event : due) ship(*event);
      due.clear();  // the events' actor references go outside the lock too
      lock.lock();
      continue;
    }
    wake_at_ = schedule_.empty() ? time_point::max() : schedule_.begin()->first;
    if (wake_at_ == time_point::max())
      cv_.wait(lock);
    else
      cv_.wait_until(lock, wake_at_);
  }
}

}  // namespace moerl::cluster
