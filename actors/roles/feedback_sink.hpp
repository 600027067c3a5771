// The feedback endpoint's RecordSink (runtime/feedback/record_sink.hpp) through the feedback collector actor:
// `moerl feedback serve` and the preferences stage of `moerl run` hand every judgement and pair the HTTP API
// takes to the collector, and answer the HTTP client only once the collector has answered that the record is
// durable (the collector answers from the store's group-commit callback).
//
// Batching: submit() (the HTTP event loop's thread) only appends to a queue under a mutex; a bridge actor
// takes everything queued and sends it to the collector as one submit(vector<Envelope>) request, with at most
// 16 such batches in flight (what queued while the bridge was busy: a few to tens of records each). The store's
// group commit joins every batch queued while a WAL sync runs into the next sync, as it does for direct writes.
// Pairs go one by one (queue), they are rare.
//
// Supervision: the bridge monitors the collector; when it dies, the requests it held fail (their HTTP clients
// get a 500: not acknowledged) and a new collector is spawned on the same store (`spawn`), which reads back
// every durable record (at most 100 times: then submissions fail with a 500 until the sink ends).
#pragma once
#include <functional>
#include <memory>
#include <string>

#include "actors/roles/feedback_collector.hpp"
#include "runtime/feedback/record_sink.hpp"

namespace moerl::actors {

class ActorRecordSink : public feedback::RecordSink {
 public:
  // `spawn` makes a collector on the store the service reads (called now, and again after each death);
  // `name` (the collector's) is for name() and error messages.
  ActorRecordSink(caf::actor_system& system, std::function<feedback_collector_actor()> spawn, std::string name);
  // Answers what is in flight (waits for the collector's replies), then stops the bridge and the collector and
  // waits until both are gone (so the caller may close the store). Submissions still queued fail.
  ~ActorRecordSink() override;
  ActorRecordSink(const ActorRecordSink&) = delete;
  ActorRecordSink& operator=(const ActorRecordSink&) = delete;

  void submit(store::Family family, uint64_t time_ns, std::vector<uint8_t> bytes, Done done) override;
  std::string name() const override;
  // moerl_feedback_collector_{batches,batched_records,restarts}_total.
  std::string metrics() const override;

  // The collector now serving (tests kill it), and how many times it was respawned.
  feedback_collector_actor collector() const;
  uint64_t restarts() const;
  // Batches sent to the collector and the records in them (submissions, not pairs).
  uint64_t batches() const;
  uint64_t batched_records() const;

  struct Shared;

 private:
  caf::actor_system& system_;
  std::string name_;
  std::shared_ptr<Shared> shared_;
  caf::actor bridge_;
};

// A collector named `name` on `store` (shared with the caller) behind an ActorRecordSink.
std::unique_ptr<ActorRecordSink> collector_sink(caf::actor_system& system, std::shared_ptr<store::DurableStore> store,
                                                std::string name);

}  // namespace moerl::actors
