// The feedback endpoint in front of the feedback collector actor (actors/roles/feedback_sink.hpp): a judgement
// submitted over HTTP is acknowledged only after the collector answered, and the collector holds it (its
// duplicate index knows it: it went through the actor, not around it); a killed collector is respawned on the
// same store and the endpoint keeps serving; a batch submitted to the collector is answered with each record's
// key, and a batch with a malformed record writes nothing.
#include <httplib.h>

#include <nlohmann/json.hpp>
#include <thread>

#include "actors/roles/feedback_sink.hpp"
#include "runtime/feedback/http_server.hpp"
#include "runtime/feedback/service.hpp"
#include "runtime/store/pair_record.hpp"
#include "tests/actors/support.hpp"

namespace moerl::actors {
namespace {

using namespace moerl::actors::testing;
using nlohmann::json;

const std::string kAdmin = "admin-secret-0123456789";
const std::string kAnnotator = "annotator-secret-0123456789";

// `moerl feedback serve` in this process: a store, a collector behind an ActorRecordSink, the service on that
// sink, the HTTP server on a free loopback port. Ends in the reverse order, as the command does.
struct Endpoint {
  explicit Endpoint(const fs::path& dir)
      : store(std::make_shared<store::DurableStore>((dir / "feedback").string())),
        system(test_config()),
        sink(collector_sink(system, store, "feedback/test")),
        service(*store, *sink,
                {{feedback::Role::Admin, "boss", kAdmin}, {feedback::Role::Annotator, "alice", kAnnotator}}),
        server(service),
        port(server.bind("127.0.0.1", 0)),
        thread([this] { server.run(); }) {}
  ~Endpoint() {
    server.stop();
    thread.join();
  }
  httplib::Client client(const std::string& token) const {
    httplib::Client c("127.0.0.1", port);
    c.set_bearer_token_auth(token.c_str());
    c.set_read_timeout(30);
    return c;
  }
  uint64_t queue_pair() const {
    const auto r = client(kAdmin).Post("/api/v1/pairs", R"({"prompt": "2+2=", "first": "4", "second": "5"})",
                                       "application/json");
    EXPECT_TRUE(r && r->status == 201) << (r ? r->body : "no answer");
    return r && r->status == 201 ? json::parse(r->body)["pair_id"].get<uint64_t>() : 0;
  }
  // POST /api/v1/comparisons; the answer's status and key ("time-seq").
  std::pair<int, std::string> compare(uint64_t pair_id, const char* choice) const {
    const auto r = client(kAnnotator).Post("/api/v1/comparisons", json{{"pair_id", pair_id}, {"choice", choice}}.dump(),
                                           "application/json");
    if (!r) return {0, ""};
    const json j = json::parse(r->body, nullptr, false);
    return {r->status, r->status == 201 ? j["key"].get<std::string>() : r->body};
  }

  std::shared_ptr<store::DurableStore> store;
  caf::actor_system system;
  std::unique_ptr<ActorRecordSink> sink;
  feedback::FeedbackService service;
  feedback::HttpServer server;
  int port;
  std::thread thread;
};

std::vector<Envelope> comparisons(caf::scoped_actor& self, const feedback_collector_actor& c) {
  return ask<std::vector<Envelope>>(self, c, nullptr, list_atom::value, std::string("Comparison"), uint64_t{0},
                                    uint64_t{1000})
      .value_or(std::vector<Envelope>{});
}

TEST(FeedbackEndpointThroughCollector, AcknowledgesAJudgementOnlyOnceTheCollectorHasStoredIt) {
  const auto dir = fresh_dir("sink-http");
  RemoveAtExit cleanup{dir};
  Endpoint e(dir);
  const uint64_t pair_id = e.queue_pair();
  ASSERT_EQ(pair_id, 1u);
  const auto [status, key] = e.compare(pair_id, "first");
  ASSERT_EQ(status, 201) << key;
  // Durable when acknowledged, and it went through the collector actor: the sink sent it in a batch ...
  EXPECT_EQ(e.store->count(store::Family::Comparison), 1u);
  EXPECT_EQ(e.sink->batched_records(), 1u);
  EXPECT_GE(e.sink->batches(), 1u);
  // ... and the collector's duplicate index holds it: the same bytes submitted to it again are not stored
  // twice (a write around the actor would be unknown to it, and stored again here).
  caf::scoped_actor self{e.system};
  const auto held = comparisons(self, e.sink->collector());
  ASSERT_EQ(held.size(), 1u);
  EXPECT_EQ(unwrap<msg::Comparison>(held[0]).annotator, "alice");
  EXPECT_EQ(ask<uint64_t>(self, e.sink->collector(), nullptr, submit_atom::value, held[0]), 1u);
  EXPECT_EQ(e.store->count(store::Family::Comparison), 1u);
  // The key in the HTTP answer is where the store holds the record.
  const auto dash = key.find('-');
  ASSERT_NE(dash, std::string::npos);
  const store::Key k{std::stoull(key.substr(0, dash)), std::stoull(key.substr(dash + 1))};
  const auto bytes = e.store->get(store::Family::Comparison, k);
  ASSERT_TRUE(bytes);
  EXPECT_EQ(*bytes, held[0].bytes);
  // /metrics says where submissions go, and counts what went through the collector.
  const auto metrics = e.client(kAdmin).Get("/metrics");
  ASSERT_TRUE(metrics);
  EXPECT_NE(metrics->body.find("moerl_feedback_sink_info{sink=\"actor feedback/test\"} 1"), std::string::npos);
  EXPECT_NE(metrics->body.find("moerl_feedback_collector_batched_records_total 1\n"), std::string::npos) << metrics->body;
}

TEST(FeedbackEndpointThroughCollector, KeepsServingWhenTheCollectorIsKilledAndRespawnedOnTheSameStore) {
  const auto dir = fresh_dir("sink-kill");
  RemoveAtExit cleanup{dir};
  Endpoint e(dir);
  const uint64_t pair_id = e.queue_pair();
  ASSERT_EQ(e.compare(pair_id, "first").first, 201);
  caf::scoped_actor self{e.system};
  const auto first = e.sink->collector();
  self->monitor(first);
  self->send_exit(first, caf::exit_reason::kill);
  self->receive([](const caf::down_msg&) {},
                caf::after(kReplyTimeout) >> [] { ADD_FAILURE() << "the killed collector did not go down"; });
  // The bridge respawns it (a request may meet the dead one in between: answered 500, not acknowledged).
  const auto deadline = std::chrono::steady_clock::now() + kReplyTimeout;
  while (e.sink->restarts() == 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  ASSERT_EQ(e.sink->restarts(), 1u);
  EXPECT_TRUE(e.sink->collector() != first);
  ASSERT_EQ(e.compare(pair_id, "second").first, 201);
  // The new collector read back the first judgement and took the second.
  const auto held = comparisons(self, e.sink->collector());
  ASSERT_EQ(held.size(), 2u);
  EXPECT_EQ(unwrap<msg::Comparison>(held[0]).choice, msg::Choice::FirstChosen);
  EXPECT_EQ(unwrap<msg::Comparison>(held[1]).choice, msg::Choice::SecondChosen);
  EXPECT_EQ(e.store->count(store::Family::Comparison), 2u);
}

msg::Rating rating(int i) {
  msg::Rating r;
  r.prompt.text = "1+" + std::to_string(i) + "=";
  r.response.text = std::to_string(1 + i);
  r.score = 5;
  r.scale_min = 1;
  r.scale_max = 7;
  r.annotator = "scripted";
  r.timestamp_ns = 1700000000000000000 + i;
  return r;
}

TEST(FeedbackCollectorBatch, AnswersEachRecordsKeyAndWritesNothingOfABatchWithAMalformedRecord) {
  const auto dir = fresh_dir("collector-batch");
  RemoveAtExit cleanup{dir};
  caf::actor_system system{test_config()};
  caf::scoped_actor self{system};
  auto store = std::make_shared<store::DurableStore>((dir / "feedback").string());
  auto collector = spawn_feedback_collector(system, store, "feedback/0");
  // Three records, the third a resent copy of the first: two writes, the copy answered with the first's key.
  const std::vector<Envelope> batch = {wrap(rating(1)), wrap(rating(2)), wrap(rating(1))};
  const auto keys = ask<std::vector<RecordKey>>(self, collector, nullptr, submit_atom::value, batch);
  ASSERT_TRUE(keys);
  ASSERT_EQ(keys->size(), 3u);
  EXPECT_EQ((*keys)[2].seq, (*keys)[0].seq);
  EXPECT_NE((*keys)[1].seq, (*keys)[0].seq);
  EXPECT_EQ(store->count(store::Family::Rating), 2u);
  for (int i = 0; i < 2; ++i) {
    const auto bytes = store->get(store::Family::Rating, store::Key{(*keys)[i].time_ns, (*keys)[i].seq});
    ASSERT_TRUE(bytes);
    EXPECT_EQ(*bytes, batch[i].bytes);
  }
  // A truncated record in the middle: refused, naming it, and the valid one before it is not written either.
  Envelope broken = wrap(rating(4));
  broken.bytes.resize(broken.bytes.size() / 2);
  caf::error err;
  EXPECT_FALSE(ask<std::vector<RecordKey>>(self, collector, &err, submit_atom::value,
                                           std::vector<Envelope>{wrap(rating(3)), broken}));
  EXPECT_NE(error_text(err).find("record 1 of 2"), std::string::npos) << describe(err);
  EXPECT_EQ(store->count(store::Family::Rating), 2u);
  self->send_exit(collector, caf::exit_reason::user_shutdown);
}

}  // namespace
}  // namespace moerl::actors
