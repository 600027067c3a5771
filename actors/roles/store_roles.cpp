// The roles that keep records: the feedback collector and the replay buffer (in memory for now).
#include <deque>
#include <map>
#include <random>
#include <set>

#include "actors/roles/feedback_collector.hpp"
#include "actors/roles/replay_buffer.hpp"

namespace moerl::actors {
namespace {

// ---- feedback collector ----

struct FeedbackState {
  std::string name;
  std::map<std::string, std::vector<Envelope>> records;  // by kind, in arrival order
};

feedback_collector_actor::behavior_type feedback_collector(feedback_collector_actor::stateful_pointer<FeedbackState> self,
                                                           std::string name) {
  auto& st = self->state;
  st.name = std::move(name);
  return {
      [&st](submit_atom, Envelope& e) {
        return guarded(st.name, [&] {
          if (e.kind == MessageTraits<msg::Comparison>::kind)
            unwrap<msg::Comparison>(e);
          else if (e.kind == MessageTraits<msg::Rating>::kind)
            unwrap<msg::Rating>(e);
          else if (e.kind == MessageTraits<msg::Correction>::kind)
            unwrap<msg::Correction>(e);
          else
            throw Error("expected a Comparison, Rating or Correction message, got \"" + e.kind.substr(0, 64) + "\"");
          auto& list = st.records[e.kind];
          list.push_back(std::move(e));
          return static_cast<uint64_t>(list.size());
        });
      },
      [&st](list_atom, const std::string& kind, uint64_t offset, uint64_t limit) {
        std::vector<Envelope> out;
        const auto it = st.records.find(kind);
        if (it == st.records.end()) return out;
        for (uint64_t i = offset; i < it->second.size() && out.size() < limit; ++i) out.push_back(it->second[i]);
        return out;
      },
  };
}

// ---- replay buffer ----

struct ReplayState {
  std::string name;
  size_t capacity = 0;
  std::deque<Envelope> records;                      // oldest first, each a validated ReplayRecord
  std::deque<std::pair<uint64_t, uint32_t>> keys;    // (request id, sample index) of each record
  std::set<std::pair<uint64_t, uint32_t>> held;
};

replay_buffer_actor::behavior_type replay_buffer(replay_buffer_actor::stateful_pointer<ReplayState> self,
                                                 size_t capacity, std::string name) {
  auto& st = self->state;
  st.name = std::move(name);
  st.capacity = std::max<size_t>(capacity, 1);
  return {
      [&st](put_atom, Envelope& e) {
        return guarded(st.name, [&] {
          const auto r = unwrap<msg::ReplayRecord>(e);
          const std::pair<uint64_t, uint32_t> key{r.rollout.request_id, r.rollout.sample_index};
          if (st.held.count(key)) return static_cast<uint64_t>(st.records.size());  // a duplicate delivery
          if (st.records.size() == st.capacity) {
            st.held.erase(st.keys.front());
            st.keys.pop_front();
            st.records.pop_front();
          }
          st.records.push_back(std::move(e));
          st.keys.push_back(key);
          st.held.insert(key);
          return static_cast<uint64_t>(st.records.size());
        });
      },
      [&st](sample_atom, uint32_t count, uint64_t seed) {
        // Partial Fisher-Yates over the indices; std::mt19937_64's output is fixed by the standard.
        std::vector<size_t> index(st.records.size());
        for (size_t i = 0; i < index.size(); ++i) index[i] = i;
        std::mt19937_64 rng(seed);
        const size_t n = std::min<size_t>(count, index.size());
        std::vector<Envelope> out;
        for (size_t i = 0; i < n; ++i) {
          std::swap(index[i], index[i + rng() % (index.size() - i)]);
          out.push_back(st.records[index[i]]);
        }
        return out;
      },
      [&st](size_atom) { return static_cast<uint64_t>(st.records.size()); },
  };
}

}  // namespace

feedback_collector_actor spawn_feedback_collector(caf::actor_system& system, std::string name) {
  return system.spawn(feedback_collector, std::move(name));
}

replay_buffer_actor spawn_replay_buffer(caf::actor_system& system, size_t capacity, std::string name) {
  return system.spawn(replay_buffer, capacity, std::move(name));
}

}  // namespace moerl::actors
