// The roles that keep records: the feedback collector and the replay buffer, on RocksDB (runtime/store/).
// A write is queued with DurableStore::append_async; the store's committer thread, once the WriteBatch holding
// it is synced, sends the actor committed(seq) and the actor answers the request it kept as a response promise.
// The actor never waits for the WAL; promises are delivered only from the actor's own thread.
#include <atomic>
#include <chrono>
#include <deque>
#include <filesystem>
#include <map>
#include <set>
#include <unistd.h>
#include <unordered_map>

#include "actors/roles/feedback_collector.hpp"
#include "actors/roles/replay_buffer.hpp"
#include "runtime/store/pair_record.hpp"

namespace moerl::actors {
namespace {

using Promise = caf::typed_response_promise<uint64_t>;

uint64_t now_ns() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch()).count());
}

// A store in `dir`, or in a fresh temporary folder (removed with the store) when `dir` is empty.
std::shared_ptr<store::DurableStore> open_store(const std::string& dir, const std::string& role) {
  if (!dir.empty()) return std::make_shared<store::DurableStore>(dir);
  static std::atomic<uint64_t> serial{0};
  std::string safe = role;
  for (char& c : safe)
    if (c == '/') c = '-';
  const auto path = std::filesystem::temp_directory_path() /
                    ("moerl-" + safe + "-" + std::to_string(::getpid()) + "-" + std::to_string(serial++));
  std::filesystem::remove_all(path);
  auto owned = std::make_unique<store::DurableStore>(path.string());
  return std::shared_ptr<store::DurableStore>(owned.release(), [path](store::DurableStore* p) {
    delete p;
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  });
}

// Requests waiting for writes to become durable, by the write's sequence number (unique in the store). A
// duplicate delivery joins the first copy's waiters. `value` computes the answer when the write is durable.
struct Waiters {
  using Callback = std::function<void(const std::string& error)>;
  struct Entry {
    std::vector<Promise> promises;
    std::function<uint64_t()> value;
    std::vector<Callback> callbacks;  // others waiting (a batch's answer), called after the promises
  };
  std::unordered_map<uint64_t, Entry> by_seq;

  bool pending(uint64_t seq) const { return by_seq.count(seq) > 0; }
  void add(uint64_t seq, Promise p, std::function<uint64_t()> value) {
    auto& e = by_seq[seq];
    e.promises.push_back(std::move(p));
    if (value) e.value = std::move(value);
  }
  void join(uint64_t seq, Promise p) { by_seq.at(seq).promises.push_back(std::move(p)); }
  void watch(uint64_t seq, Callback c) { by_seq[seq].callbacks.push_back(std::move(c)); }
  void done(uint64_t seq, const std::string& error, const std::string& actor) {
    const auto it = by_seq.find(seq);
    if (it == by_seq.end()) return;
    auto entry = std::move(it->second);
    by_seq.erase(it);
    for (auto& p : entry.promises) {
      if (error.empty())
        p.deliver(entry.value());
      else
        p.deliver(actor_error(msg::ErrorCode::Internal, "store write failed: " + error, actor));
    }
    for (auto& c : entry.callbacks) c(error);
  }
};

// The committer's callback: tells the actor (if it still lives) that write `seq` is durable. Holds a weak
// reference, so a queued write does not keep a killed actor alive.
template <class Handle>
store::DurableStore::Done notify(caf::weak_actor_ptr self) {
  return [self](const store::Key& k, const std::string& error) {
    if (auto strong = caf::actor_cast<caf::strong_actor_ptr>(self))
      caf::anon_send(caf::actor_cast<Handle>(strong), committed_atom::value, k.seq, error);
  };
}

// The committer's callback for the writes of one batch: a single committed(seqs, error) to the actor once every
// write added has been committed (one message per batch instead of one per record). hold() before each
// append_async; release() once the last is queued (or the queueing failed): the message waits for both.
class BatchCommit : public std::enable_shared_from_this<BatchCommit> {
 public:
  explicit BatchCommit(caf::weak_actor_ptr self) : self_(std::move(self)) {}
  store::DurableStore::Done hold() {
    ++outstanding_;
    return [batch = shared_from_this()](const store::Key& k, const std::string& error) { batch->done(k.seq, error); };
  }
  void release() { done(0, ""); }

 private:
  void done(uint64_t seq, const std::string& error) {  // seq 0: release()
    {
      std::lock_guard lock(mutex_);
      if (seq) seqs_.push_back(seq);
      if (error_.empty()) error_ = error;
      if (--outstanding_ > 0) return;
    }
    if (auto strong = caf::actor_cast<caf::strong_actor_ptr>(self_))
      caf::anon_send(caf::actor_cast<feedback_collector_actor>(strong), committed_atom::value, std::move(seqs_), error_);
  }

  caf::weak_actor_ptr self_;
  std::mutex mutex_;
  size_t outstanding_ = 1;  // release()'s
  std::vector<uint64_t> seqs_;
  std::string error_;
};

// ---- feedback collector ----

store::Family family_of(const std::string& kind) {
  if (kind == MessageTraits<msg::Comparison>::kind) return store::Family::Comparison;
  if (kind == MessageTraits<msg::Rating>::kind) return store::Family::Rating;
  if (kind == MessageTraits<msg::Correction>::kind) return store::Family::Correction;
  if (kind == kPairToJudgeKind) return store::Family::Pair;
  throw Error("expected a Comparison, Rating, Correction or PairToJudge kind, got \"" + kind.substr(0, 64) + "\"");
}

uint64_t content_hash(std::span<const uint8_t> bytes) {
  return std::hash<std::string_view>{}(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
}

// The index key of a submission: its family and the hash of its bytes (a match is confirmed on the bytes).
uint64_t submission_id(store::Family family, uint64_t hash) { return hash * 8 + static_cast<uint64_t>(family); }

struct FeedbackState {
  std::string name;
  std::shared_ptr<store::DurableStore> store;
  // Submissions by family and hash of their bytes -> keys (a hash match is confirmed on the bytes).
  std::unordered_multimap<uint64_t, store::Key> submitted;  // by submission_id(family, bytes)
  std::unordered_map<uint64_t, std::vector<uint8_t>> in_flight;  // bytes of writes not yet durable, by seq
  std::map<uint64_t, store::Key> pairs;                          // pair id -> key
  Waiters waiters;

  // The held record of `family` with exactly these bytes, if any.
  std::optional<store::Key> find_submission(store::Family family, std::span<const uint8_t> bytes) const {
    const auto [lo, hi] = submitted.equal_range(submission_id(family, content_hash(bytes)));
    for (auto it = lo; it != hi; ++it) {
      const auto flying = in_flight.find(it->second.seq);
      if (flying != in_flight.end()) {
        if (std::equal(bytes.begin(), bytes.end(), flying->second.begin(), flying->second.end())) return it->second;
      } else if (const auto held = store->get(family, it->second);
                 held && std::equal(bytes.begin(), bytes.end(), held->begin(), held->end())) {
        return it->second;
      }
    }
    return std::nullopt;
  }

  // Write `seq` is durable, or failed with `error`: answers those waiting for it.
  void committed(uint64_t seq, const std::string& error) {
    in_flight.erase(seq);
    if (!error.empty()) {  // not stored: a later delivery of the same record is not a duplicate
      std::erase_if(submitted, [seq](const auto& e) { return e.second.seq == seq; });
      std::erase_if(pairs, [seq](const auto& e) { return e.second.seq == seq; });
    }
    waiters.done(seq, error, name);
  }
};

feedback_collector_actor::behavior_type feedback_collector(feedback_collector_actor::stateful_pointer<FeedbackState> self,
                                                           std::shared_ptr<store::DurableStore> db, std::string name) {
  auto& st = self->state;
  st.name = std::move(name);
  st.store = std::move(db);
  for (auto family : {store::Family::Comparison, store::Family::Rating, store::Family::Correction})
    st.store->scan(family, 0, UINT64_MAX, [&](const store::Key& k, std::span<const uint8_t> bytes) {
      st.submitted.emplace(submission_id(family, content_hash(bytes)), k);
      return true;
    });
  st.store->scan(store::Family::Pair, 0, UINT64_MAX, [&](const store::Key& k, std::span<const uint8_t> bytes) {
    st.pairs.emplace(store::decode_pair(bytes).pair_id, k);
    return true;
  });
  const caf::weak_actor_ptr weak{self->ctrl()};
  return {
      [self, &st, weak](submit_atom, Envelope& e) {
        return guarded(st.name, [&]() -> caf::result<uint64_t> {
          const auto family = family_of(e.kind);
          if (family == store::Family::Comparison) unwrap<msg::Comparison>(e);
          else if (family == store::Family::Rating) unwrap<msg::Rating>(e);
          else if (family == store::Family::Correction) unwrap<msg::Correction>(e);
          else throw Error("submit: expected a Comparison, Rating or Correction message, got a PairToJudge (queue it)");
          auto promise = self->make_response_promise<uint64_t>();
          if (const auto held = st.find_submission(family, e.bytes)) {  // a duplicate delivery
            if (st.waiters.pending(held->seq)) st.waiters.join(held->seq, promise);
            else promise.deliver(st.store->count(family));
            return promise;
          }
          const uint64_t hash = content_hash(e.bytes);
          const auto bytes = e.bytes;
          const auto key = st.store->append_async(family, now_ns(), std::move(e.bytes),
                                                  notify<feedback_collector_actor>(weak));
          st.submitted.emplace(submission_id(family, hash), key);
          st.in_flight.emplace(key.seq, bytes);
          st.waiters.add(key.seq, promise, [&st, family] { return st.store->count(family); });
          return promise;
        });
      },
      [self, &st, weak](submit_atom, std::vector<Envelope>& batch) -> caf::result<std::vector<RecordKey>> {
        std::vector<store::Family> families;
        try {  // every record checked before any is written
          for (const Envelope& e : batch) {
            const auto family = family_of(e.kind);
            if (family == store::Family::Comparison) unwrap<msg::Comparison>(e);
            else if (family == store::Family::Rating) unwrap<msg::Rating>(e);
            else if (family == store::Family::Correction) unwrap<msg::Correction>(e);
            else throw Error("submit: expected Comparison, Rating or Correction messages, got a PairToJudge (queue it)");
            families.push_back(family);
          }
        } catch (const Error& e) {
          return actor_error(msg::ErrorCode::InvalidRequest, "record " + std::to_string(families.size()) + " of " +
                                                                 std::to_string(batch.size()) + ": " + e.what(), st.name);
        }
        // The answer, once `outstanding` (the writes awaited, and 1 until every record is queued) drops to 0.
        struct Answer {
          caf::typed_response_promise<std::vector<RecordKey>> promise;
          std::vector<RecordKey> keys;
          size_t outstanding = 1;
          std::string error;
          std::string actor;
          void done(const std::string& e) {
            if (error.empty()) error = e;
            if (--outstanding > 0) return;
            if (error.empty()) promise.deliver(std::move(keys));
            else promise.deliver(actor_error(msg::ErrorCode::Internal, "store write failed: " + error, actor));
          }
        };
        auto answer = std::make_shared<Answer>();
        answer->promise = self->make_response_promise<std::vector<RecordKey>>();
        answer->keys.resize(batch.size());
        answer->actor = st.name;
        const auto await = [&](uint64_t seq) {
          ++answer->outstanding;
          st.waiters.watch(seq, [answer](const std::string& error) { answer->done(error); });
        };
        const auto commit = std::make_shared<BatchCommit>(weak);
        bool unreleased = false;  // a hold() whose append_async threw: its callback never runs
        try {
          for (size_t i = 0; i < batch.size(); ++i) {
            const auto family = families[i];
            if (const auto held = st.find_submission(family, batch[i].bytes)) {  // a duplicate delivery
              answer->keys[i] = RecordKey{held->time_ns, held->seq};
              if (st.waiters.pending(held->seq)) await(held->seq);
              continue;
            }
            const uint64_t hash = content_hash(batch[i].bytes);
            auto bytes = batch[i].bytes;  // kept until durable: duplicates are compared against it
            unreleased = true;
            const auto key = st.store->append_async(family, now_ns(), std::move(batch[i].bytes), commit->hold());
            unreleased = false;
            st.submitted.emplace(submission_id(family, hash), key);
            st.in_flight.emplace(key.seq, std::move(bytes));
            answer->keys[i] = RecordKey{key.time_ns, key.seq};
            await(key.seq);
          }
        } catch (const std::exception& e) {  // the store is closing: what was queued still commits
          answer->error = e.what();
          if (unreleased) commit->release();
        }
        commit->release();
        auto promise = answer->promise;
        answer->done("");
        return promise;
      },
      [&st](list_atom, const std::string& kind, uint64_t offset, uint64_t limit) {
        return guarded(st.name, [&] {
          std::vector<Envelope> out;
          const auto family = family_of(kind);
          uint64_t index = 0;
          if (limit == 0) return out;
          st.store->scan(family, 0, UINT64_MAX, [&](const store::Key&, std::span<const uint8_t> bytes) {
            if (index++ >= offset) out.push_back(Envelope{kind, std::vector<uint8_t>(bytes.begin(), bytes.end())});
            return out.size() < limit;
          });
          return out;
        });
      },
      [self, &st, weak](queue_atom, Envelope& e) {
        return guarded(st.name, [&]() -> caf::result<uint64_t> {
          require(e.kind == kPairToJudgeKind, "queue: expected a PairToJudge message, got \"" + e.kind.substr(0, 64) + "\"");
          const auto pair = store::decode_pair(e.bytes);  // pairId > 0, createdNs > 0: the codec's rules
          auto promise = self->make_response_promise<uint64_t>();
          if (const auto it = st.pairs.find(pair.pair_id); it != st.pairs.end()) {  // a duplicate delivery
            if (st.waiters.pending(it->second.seq)) st.waiters.join(it->second.seq, promise);
            else promise.deliver(pair.pair_id);
            return promise;
          }
          auto bytes = std::move(e.bytes);
          const auto key = st.store->append_async(store::Family::Pair, static_cast<uint64_t>(pair.created_ns),
                                                  std::move(bytes), notify<feedback_collector_actor>(weak));
          st.pairs.emplace(pair.pair_id, key);
          const uint64_t id = pair.pair_id;
          st.waiters.add(key.seq, promise, [id] { return id; });
          return promise;
        });
      },
      [&st](next_atom, uint64_t after) {
        return guarded(st.name, [&] {
          std::vector<Envelope> out;
          for (auto it = st.pairs.upper_bound(after); it != st.pairs.end() && out.empty(); ++it)
            if (!st.waiters.pending(it->second.seq))
              if (auto bytes = st.store->get(store::Family::Pair, it->second))
                out.push_back(Envelope{kPairToJudgeKind, std::move(*bytes)});
          return out;
        });
      },
      [&st](committed_atom, const std::vector<uint64_t>& seqs, const std::string& error) {
        for (const uint64_t seq : seqs) st.committed(seq, error);
      },
      [&st](committed_atom, uint64_t seq, const std::string& error) { st.committed(seq, error); },
  };
}
// ---- replay buffer ----

using RolloutId = std::pair<uint64_t, uint32_t>;  // (request id, sample index)

struct ReplayState {
  std::string name;
  size_t capacity = 0;
  std::shared_ptr<store::DurableStore> store;
  std::deque<std::pair<store::Key, RolloutId>> order;  // held records, oldest first (durable or in flight)
  std::map<RolloutId, store::Key> held;
  Waiters waiters;
};

std::vector<Envelope> replay_envelopes(std::vector<std::vector<uint8_t>> records) {
  std::vector<Envelope> out;
  for (auto& bytes : records) out.push_back(Envelope{MessageTraits<msg::ReplayRecord>::kind, std::move(bytes)});
  return out;
}

replay_buffer_actor::behavior_type replay_buffer(replay_buffer_actor::stateful_pointer<ReplayState> self,
                                                 size_t capacity, std::string name,
                                                 std::shared_ptr<store::DurableStore> db) {
  auto& st = self->state;
  st.name = std::move(name);
  st.capacity = std::max<size_t>(capacity, 1);
  st.store = std::move(db);
  st.store->scan(store::Family::Replay, 0, UINT64_MAX, [&](const store::Key& k, std::span<const uint8_t> bytes) {
    const auto r = msg::decode_replay_record(bytes);
    const RolloutId id{r.rollout.request_id, r.rollout.sample_index};
    st.order.emplace_back(k, id);
    st.held[id] = k;
    return true;
  });
  while (st.order.size() > st.capacity) {  // a smaller capacity than the store was written with
    st.store->erase(store::Family::Replay, st.order.front().first);
    st.held.erase(st.order.front().second);
    st.order.pop_front();
  }
  const caf::weak_actor_ptr weak{self->ctrl()};
  return {
      [self, &st, weak](put_atom, Envelope& e) {
        return guarded(st.name, [&]() -> caf::result<uint64_t> {
          const auto r = unwrap<msg::ReplayRecord>(e);
          const RolloutId id{r.rollout.request_id, r.rollout.sample_index};
          auto promise = self->make_response_promise<uint64_t>();
          if (const auto it = st.held.find(id); it != st.held.end()) {  // a duplicate delivery
            if (st.waiters.pending(it->second.seq)) st.waiters.join(it->second.seq, promise);
            else promise.deliver(static_cast<uint64_t>(st.order.size()));
            return promise;
          }
          // The oldest goes first: queued before the new record, its deletion is durable when the record is.
          while (st.order.size() >= st.capacity) {
            st.store->erase_async(store::Family::Replay, st.order.front().first);
            st.held.erase(st.order.front().second);
            st.order.pop_front();
          }
          const auto key = st.store->append_async(store::Family::Replay, now_ns(), std::move(e.bytes),
                                                  notify<replay_buffer_actor>(weak), r.rollout.policy_version.version);
          st.order.emplace_back(key, id);
          st.held[id] = key;
          // The count when accepted, not when durable: answers do not depend on how the commits fell.
          st.waiters.add(key.seq, promise, [n = static_cast<uint64_t>(st.order.size())] { return n; });
          return promise;
        });
      },
      [&st](sample_atom, uint32_t count, uint64_t seed) {
        return guarded(st.name, [&] { return replay_envelopes(st.store->sample(store::Family::Replay, count, seed)); });
      },
      [&st](size_atom) { return static_cast<uint64_t>(st.order.size()); },
      [&st](list_atom, uint64_t from_ns, uint64_t to_ns, uint64_t limit) {
        return guarded(st.name, [&] {
          std::vector<std::vector<uint8_t>> out;
          if (limit > 0)
            st.store->scan(store::Family::Replay, from_ns, to_ns, [&](const store::Key&, std::span<const uint8_t> b) {
              out.emplace_back(b.begin(), b.end());
              return out.size() < limit;
            });
          return replay_envelopes(std::move(out));
        });
      },
      [&st](version_atom, uint64_t from, uint64_t to, uint64_t limit) {
        return guarded(st.name, [&] {
          std::vector<std::vector<uint8_t>> out;
          if (limit > 0)
            st.store->scan_by_version(from, to, [&](const store::Key&, std::span<const uint8_t> b) {
              out.emplace_back(b.begin(), b.end());
              return out.size() < limit;
            });
          return replay_envelopes(std::move(out));
        });
      },
      [&st](committed_atom, uint64_t seq, const std::string& error) {
        if (!error.empty()) {  // not stored: forget it, so a later delivery is not taken for a duplicate
          std::erase_if(st.order, [seq](const auto& e) { return e.first.seq == seq; });
          std::erase_if(st.held, [seq](const auto& e) { return e.second.seq == seq; });
        }
        st.waiters.done(seq, error, st.name);
      },
  };
}

}  // namespace

feedback_collector_actor spawn_feedback_collector(caf::actor_system& system, std::string name, std::string db_dir) {
  auto store = open_store(db_dir, name);
  return system.spawn(feedback_collector, std::move(store), std::move(name));
}

feedback_collector_actor spawn_feedback_collector(caf::actor_system& system, std::shared_ptr<store::DurableStore> store,
                                                  std::string name) {
  require(store != nullptr, "spawn_feedback_collector: no store");
  return system.spawn(feedback_collector, std::move(store), std::move(name));
}

replay_buffer_actor spawn_replay_buffer(caf::actor_system& system, size_t capacity, std::string name, std::string db_dir) {
  auto store = open_store(db_dir, name);
  return system.spawn(replay_buffer, capacity, std::move(name), std::move(store));
}

}  // namespace moerl::actors
