// ActorRecordSink: a queue filled by the HTTP loop, drained in batches to the feedback collector by a bridge
// actor that also respawns the collector when it dies.
#include "actors/roles/feedback_sink.hpp"

#include <atomic>
#include <mutex>

#include "runtime/error.hpp"

namespace moerl::actors {
namespace {

using sink_flush_atom = caf::atom_constant<caf::atom("sinkflush")>;
using sink_stop_atom = caf::atom_constant<caf::atom("sinkstop")>;

// Batches in flight to the collector. Not 1 or 2: a batch held back until an earlier one is durable misses the
// WAL sync it could have joined, so each record waits one sync longer and the 128 clients of bench feedback get
// fewer answers per sync (measured, 2 cores, bench feedback: 13.6k/s with 2, 14.8k with 4 under load; on the
// idle machine 15.1k-20.9k/s, p99 13.9-22.5 ms with 16 and 28.1k-29.7k/s, p99 8.1-8.8 ms with 64). With a wide
// window the bridge sends what has queued at once, and the store's committer joins every batch queued during a
// sync into the next one, as it does for direct writes.
constexpr size_t kWindow = 64;
// A batch waits for one WAL sync (ms); a collector that does not answer in this fails the batch (HTTP 500)
// rather than leaving its clients waiting forever.
constexpr auto kReplyTimeout = std::chrono::seconds(60);
// A collector that dies again at once (e.g. its store cannot be read) is not respawned forever: past this many
// restarts the dead one stays, and every submission is answered with the error (500) until the sink ends.
constexpr uint64_t kMaxRestarts = 100;

struct Item {
  store::Family family = store::Family::Comparison;
  uint64_t time_ns = 0;
  std::vector<uint8_t> bytes;
  feedback::RecordSink::Done done;
};

const char* kind_of(store::Family f) {
  switch (f) {
    case store::Family::Comparison: return MessageTraits<msg::Comparison>::kind;
    case store::Family::Rating: return MessageTraits<msg::Rating>::kind;
    case store::Family::Correction: return MessageTraits<msg::Correction>::kind;
    case store::Family::Pair: return kPairToJudgeKind;
    default: throw Error(std::string("feedback sink: records of family ") + store::family_name(f) + " are not feedback");
  }
}

}  // namespace

struct ActorRecordSink::Shared {
  mutable std::mutex mutex;
  std::vector<Item> queue;  // submitted, not yet taken by the bridge
  bool scheduled = false;   // a flush is on its way to the bridge, or the bridge will look again on a reply
  bool closed = false;
  feedback_collector_actor collector;
  std::atomic<uint64_t> restarts{0}, batches{0}, records{0};
};

namespace {

struct BridgeState {
  std::shared_ptr<ActorRecordSink::Shared> shared;
  std::function<feedback_collector_actor()> spawn;
  feedback_collector_actor collector;
  size_t batches_in_flight = 0, pairs_in_flight = 0;
  std::vector<caf::response_promise> stopping;  // stop requests, answered once nothing is in flight
};

using Bridge = caf::stateful_actor<BridgeState>;

void answer_stop_requests(Bridge* self) {
  auto& st = self->state;
  if (st.batches_in_flight > 0 || st.pairs_in_flight > 0) return;
  for (auto& p : st.stopping) p.deliver(true);
  st.stopping.clear();
}

void send_batches(Bridge* self);

void send_pair(Bridge* self, Item item) {
  auto& st = self->state;
  ++st.pairs_in_flight;
  auto done = std::make_shared<feedback::RecordSink::Done>(std::move(item.done));
  const store::Key key{item.time_ns, 0};
  self->request(st.collector, kReplyTimeout, queue_atom::value, Envelope{kPairToJudgeKind, std::move(item.bytes)})
      .then(
          [self, done, key](uint64_t) {
            (*done)(key, "");
            --self->state.pairs_in_flight;
            answer_stop_requests(self);
          },
          [self, done, key](caf::error& e) {
            (*done)(key, describe(e));
            --self->state.pairs_in_flight;
            answer_stop_requests(self);
          });
}

// Takes what is queued and sends it, while fewer than kWindow batches are in flight.
void send_batches(Bridge* self) {
  auto& st = self->state;
  while (st.batches_in_flight < kWindow) {
    std::vector<Item> items;
    {
      std::lock_guard lock(st.shared->mutex);
      items.swap(st.shared->queue);
      if (items.empty()) {
        st.shared->scheduled = false;
        return;
      }
    }
    std::vector<Envelope> batch;
    auto dones = std::make_shared<std::vector<feedback::RecordSink::Done>>();
    batch.reserve(items.size());
    dones->reserve(items.size());
    for (Item& item : items) {
      if (item.family == store::Family::Pair) {
        send_pair(self, std::move(item));
        continue;
      }
      batch.push_back(Envelope{kind_of(item.family), std::move(item.bytes)});
      dones->push_back(std::move(item.done));
    }
    if (batch.empty()) continue;
    ++st.batches_in_flight;
    ++st.shared->batches;
    st.shared->records += batch.size();
    self->request(st.collector, kReplyTimeout, submit_atom::value, std::move(batch))
        .then(
            [self, dones](std::vector<RecordKey>& keys) {
              for (size_t i = 0; i < dones->size(); ++i) {
                if (i < keys.size()) (*dones)[i](store::Key{keys[i].time_ns, keys[i].seq}, "");
                else (*dones)[i](store::Key{}, "the collector answered " + std::to_string(keys.size()) + " keys for " +
                                                   std::to_string(dones->size()) + " records");
              }
              --self->state.batches_in_flight;
              send_batches(self);
              answer_stop_requests(self);
            },
            [self, dones](caf::error& e) {
              const std::string message = describe(e);
              for (auto& done : *dones) done(store::Key{}, message);
              --self->state.batches_in_flight;
              send_batches(self);
              answer_stop_requests(self);
            });
  }
}

caf::behavior bridge(Bridge* self, std::shared_ptr<ActorRecordSink::Shared> shared,
                     std::function<feedback_collector_actor()> spawn, feedback_collector_actor collector) {
  auto& st = self->state;
  st.shared = std::move(shared);
  st.spawn = std::move(spawn);
  st.collector = std::move(collector);
  self->monitor(st.collector);
  self->set_down_handler([self](caf::down_msg& m) {
    auto& st = self->state;
    if (m.source != st.collector.address()) return;
    {
      std::lock_guard lock(st.shared->mutex);
      if (st.shared->closed || st.shared->restarts >= kMaxRestarts) return;
    }
    // The requests it held come back as errors (their clients get a 500); new ones go to its successor.
    st.collector = st.spawn();
    self->monitor(st.collector);
    ++st.shared->restarts;
    std::lock_guard lock(st.shared->mutex);
    st.shared->collector = st.collector;
  });
  return {
      [self](sink_flush_atom) { send_batches(self); },
      [self](sink_stop_atom) -> caf::result<bool> {
        auto promise = self->make_response_promise();
        self->state.stopping.push_back(promise);
        answer_stop_requests(self);
        return caf::delegated<bool>();
      },
  };
}

}  // namespace

ActorRecordSink::ActorRecordSink(caf::actor_system& system, std::function<feedback_collector_actor()> spawn,
                                 std::string name)
    : system_(system), name_(std::move(name)), shared_(std::make_shared<Shared>()) {
  require(static_cast<bool>(spawn), "ActorRecordSink: no way to spawn the collector");
  shared_->collector = spawn();
  bridge_ = system_.spawn(bridge, shared_, std::move(spawn), shared_->collector);
}

ActorRecordSink::~ActorRecordSink() {
  std::vector<Item> left;
  {
    std::lock_guard lock(shared_->mutex);
    shared_->closed = true;
    left.swap(shared_->queue);
  }
  for (auto& item : left) item.done(store::Key{}, name() + ": closed");
  caf::scoped_actor self{system_};
  // Lets the bridge answer what is in flight (the collector's replies); the queue is empty now.
  self->request(bridge_, kReplyTimeout + std::chrono::seconds(5), sink_stop_atom::value)
      .receive([](bool) {}, [](caf::error&) {});
  const auto stop = [&self](const auto& a) {
    self->monitor(a);
    self->send_exit(a, caf::exit_reason::user_shutdown);
    self->receive([](const caf::down_msg&) {}, caf::after(std::chrono::seconds(30)) >> [] {});
  };
  stop(bridge_);
  stop(collector());  // the bridge is gone: no respawn after this
}

void ActorRecordSink::submit(store::Family family, uint64_t time_ns, std::vector<uint8_t> bytes, Done done) {
  kind_of(family);  // feedback families only
  bool flush = false;
  {
    std::lock_guard lock(shared_->mutex);
    require(!shared_->closed, name() + ": closed");
    shared_->queue.push_back(Item{family, time_ns, std::move(bytes), std::move(done)});
    flush = !shared_->scheduled;
    shared_->scheduled = true;
  }
  if (flush) caf::anon_send(bridge_, sink_flush_atom::value);
}

std::string ActorRecordSink::name() const { return "actor " + name_; }

std::string ActorRecordSink::metrics() const {
  return "# HELP moerl_feedback_collector_batches_total Requests carrying submissions to the collector actor.\n"
         "# TYPE moerl_feedback_collector_batches_total counter\nmoerl_feedback_collector_batches_total " +
         std::to_string(batches()) +
         "\n# TYPE moerl_feedback_collector_batched_records_total counter\nmoerl_feedback_collector_batched_records_total " +
         std::to_string(batched_records()) +
         "\n# HELP moerl_feedback_collector_restarts_total Collector actors respawned after a death.\n"
         "# TYPE moerl_feedback_collector_restarts_total counter\nmoerl_feedback_collector_restarts_total " +
         std::to_string(restarts()) + "\n";
}

feedback_collector_actor ActorRecordSink::collector() const {
  std::lock_guard lock(shared_->mutex);
  return shared_->collector;
}
uint64_t ActorRecordSink::restarts() const { return shared_->restarts; }
uint64_t ActorRecordSink::batches() const { return shared_->batches; }
uint64_t ActorRecordSink::batched_records() const { return shared_->records; }

std::unique_ptr<ActorRecordSink> collector_sink(caf::actor_system& system, std::shared_ptr<store::DurableStore> store,
                                                std::string name) {
  require(store != nullptr, "collector_sink: no store");
  auto spawn = [&system, store, name] { return spawn_feedback_collector(system, store, name); };
  return std::make_unique<ActorRecordSink>(system, std::move(spawn), name);
}

}  // namespace moerl::actors
