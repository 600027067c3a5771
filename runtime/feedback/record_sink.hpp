// Where the feedback endpoint's records go: FeedbackService validates and encodes a judgement (or a pair to
// judge) and hands it to a RecordSink, which answers once the record is durable. The service knows only this
// interface: in `moerl feedback serve` and in the preferences stage of `moerl run` the sink is the feedback
// collector actor (actors/roles/feedback_sink.hpp); StoreSink below writes the store directly (unit tests, and
// the preferences stage without actors).
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "runtime/store/durable_store.hpp"

namespace moerl::feedback {

class RecordSink {
 public:
  virtual ~RecordSink() = default;

  // done(key, "") once the record is durable (key: where it is stored; for a duplicate delivery the held
  // copy's key), or done(key, message) when it was not stored (key then meaningless). Called exactly once,
  // from any thread but the caller's own stack frame is not assumed (it may run before submit returns); it
  // must be quick. `family` is Comparison, Rating or Correction (`bytes` one encoded msg::Comparison, ...), or
  // Pair (`bytes` one store::encode(PairToJudge) with pairId > 0 and createdNs > 0; its key's time is
  // createdNs). `time_ns` (> 0) is the record's arrival time. Throws moerl::Error only when the sink is
  // closed; then `done` is not called.
  using Done = store::DurableStore::Done;
  virtual void submit(store::Family family, uint64_t time_ns, std::vector<uint8_t> bytes, Done done) = 0;

  // For /metrics and logs: "store" or e.g. "actor feedback/serve".
  virtual std::string name() const = 0;
  // Lines of Prometheus text for /metrics about the sink's own work ("" when it has none).
  virtual std::string metrics() const { return ""; }
};

// Straight into a DurableStore (its group commit): the sink of a service without actors.
class StoreSink : public RecordSink {
 public:
  explicit StoreSink(store::DurableStore& store) : store_(store) {}
  void submit(store::Family family, uint64_t time_ns, std::vector<uint8_t> bytes, Done done) override {
    store_.append_async(family, time_ns, std::move(bytes), std::move(done));
  }
  std::string name() const override { return "store"; }

 private:
  store::DurableStore& store_;
};

// Submits and waits until `done` is called: the key, or throws moerl::Error with the sink's message.
store::Key submit_and_wait(RecordSink& sink, store::Family family, uint64_t time_ns, std::vector<uint8_t> bytes);

}  // namespace moerl::feedback
