// The feedback API end to end over loopback HTTP (an in-process server on a free port): the judging flow,
// export, metrics, and the right 4xx with a message for every kind of bad request.
#include <gtest/gtest.h>
#include <httplib.h>

#include <nlohmann/json.hpp>
#include <thread>

#include "runtime/feedback/http_server.hpp"
#include "runtime/feedback/service.hpp"
#include "runtime/messages/codec.hpp"
#include "tests/feedback/temp_dir.hpp"

namespace moerl::feedback {
namespace {

using nlohmann::json;

const std::string kAdmin = "admin-secret-0123456789";
const std::string kAnnotator = "annotator-secret-0123456789";

std::vector<TokenEntry> tokens() {
  return {{Role::Admin, "boss", kAdmin}, {Role::Annotator, "alice", kAnnotator}};
}

// A server on 127.0.0.1:<free port> over a fresh store, stopped and joined at scope end.
struct Served {
  explicit Served(ServiceOptions options = {})
      : store(dir.path()), service(store, tokens(), options), server(service, 8), port(server.bind("127.0.0.1", 0)),
        thread([this] { server.run(); }) {}
  ~Served() {
    server.stop();
    thread.join();
  }
  httplib::Client client(const std::string& token = "") const {
    httplib::Client c("127.0.0.1", port);
    if (!token.empty()) c.set_bearer_token_auth(token.c_str());
    return c;
  }
  test::TempDir dir;
  store::DurableStore store;
  FeedbackService service;
  HttpServer server;
  int port;
  std::thread thread;
};

// status, and the "error" message of a 4xx/5xx answer.
std::pair<int, std::string> answer(const httplib::Result& r) {
  if (!r) return {0, "no answer"};
  const json j = json::parse(r->body, nullptr, false);
  return {r->status, j.is_object() && j.contains("error") ? j["error"].get<std::string>() : std::string()};
}

uint64_t queue_pair(Served& s) {
  auto admin = s.client(kAdmin);
  const auto r = admin.Post("/api/v1/pairs",
                            json{{"prompt", "What is 2+2?"}, {"first", "4"}, {"second", "5"},
                                 {"first_policy", {{"version", 3}, {"step", 30}}}}.dump(),
                            "application/json");
  EXPECT_TRUE(r && r->status == 201) << (r ? r->body : "no answer");
  return json::parse(r->body)["pair_id"].get<uint64_t>();
}

TEST(FeedbackApi, JudgesAPairAndStoresTheComparisonDurablyWithItsProvenance) {
  Served s;
  EXPECT_EQ(s.client().Get("/healthz")->body, "ok\n");
  const uint64_t id = queue_pair(s);
  auto alice = s.client(kAnnotator);
  const auto next = alice.Get("/api/v1/next");
  ASSERT_EQ(next->status, 200);
  const json pair = json::parse(next->body)["pair"];
  EXPECT_EQ(pair["pair_id"], id);
  EXPECT_EQ(pair["prompt"], "What is 2+2?");
  const auto r = alice.Post("/api/v1/comparisons", json{{"pair_id", id}, {"choice", "first"}}.dump(), "application/json");
  ASSERT_EQ(r->status, 201) << r->body;
  EXPECT_EQ(json::parse(r->body)["judged"], 1);
  ASSERT_EQ(s.store.count(store::Family::Comparison), 1u);
  const auto stored = msg::decode_comparison(s.store.sample(store::Family::Comparison, 1, 0)[0]);
  EXPECT_EQ(stored.annotator, "alice");
  EXPECT_EQ(stored.choice, msg::Choice::FirstChosen);
  EXPECT_EQ(stored.first.text, "4");
  EXPECT_EQ(stored.first_policy, (msg::PolicyVersion{3, 30}));
  EXPECT_GT(stored.timestamp_ns, 0);

  const auto rating = alice.Post("/api/v1/ratings", json{{"pair_id", id}, {"response", "second"}, {"score", 2}}.dump(),
                                 "application/json");
  ASSERT_EQ(rating->status, 201) << rating->body;
  EXPECT_EQ(msg::decode_rating(s.store.sample(store::Family::Rating, 1, 0)[0]).response.text, "5");

  const auto exported = s.client(kAdmin).Get("/api/v1/export?kind=comparisons");
  ASSERT_EQ(exported->status, 200);
  const json line = json::parse(exported->body.substr(0, exported->body.find('\n')));
  EXPECT_EQ(line["chosen"], "4");
  EXPECT_EQ(line["rejected"], "5");
  const auto metrics = s.client().Get("/metrics")->body;
  EXPECT_NE(metrics.find("moerl_feedback_submissions_total{kind=\"comparison\"} 1"), std::string::npos) << metrics;
  EXPECT_NE(s.client().Get("/")->body.find("pick-first"), std::string::npos) << "the page is served";
}

TEST(FeedbackApi, RefusesUnauthenticatedAndUnauthorizedRequestsWithAMessage) {
  Served s;
  const std::string body = R"({"pair_id": 1, "choice": "tie"})";
  auto [status, error] = answer(s.client().Post("/api/v1/comparisons", body, "application/json"));
  EXPECT_EQ(status, 401);
  EXPECT_NE(error.find("Authorization"), std::string::npos) << error;
  std::tie(status, error) = answer(s.client("wrong-token-0123456789").Post("/api/v1/comparisons", body, "application/json"));
  EXPECT_EQ(status, 401);
  EXPECT_NE(error.find("unknown token"), std::string::npos) << error;
  for (const char* route : {"/api/v1/export?kind=comparisons", "/api/v1/config"}) {
    std::tie(status, error) = answer(s.client(kAnnotator).Get(route));
    EXPECT_EQ(status, 403) << route;
    EXPECT_NE(error.find("admin"), std::string::npos) << error;
  }
  std::tie(status, error) = answer(s.client(kAnnotator).Post("/api/v1/pairs", R"({"prompt":"a","first":"b","second":"c"})", "application/json"));
  EXPECT_EQ(status, 403);
  EXPECT_EQ(s.client(kAdmin).Get("/api/v1/config")->status, 200);
}

TEST(FeedbackApi, AnswersMalformedOversizedAndMistypedBodiesWithThe4xxThatNamesTheProblem) {
  Served s;
  const uint64_t id = queue_pair(s);
  auto alice = s.client(kAnnotator);
  const auto post = [&](const std::string& path, const std::string& body) {
    return answer(alice.Post(path, body, "application/json"));
  };
  struct Case {
    std::string path, body;
    int status;
    std::string says;
  };
  const std::string pid = std::to_string(id);
  const std::vector<Case> cases = {
      {"/api/v1/comparisons", "{\"pair_id\": " + pid + ", \"choice\": ", 400, "not valid JSON"},
      {"/api/v1/comparisons", "", 400, "empty body"},
      {"/api/v1/comparisons", "[1, 2]", 400, "expected an object"},
      {"/api/v1/comparisons", "{\"pair_id\": \"" + pid + "\", \"choice\": \"tie\"}", 400, "pair_id"},
      {"/api/v1/comparisons", "{\"pair_id\": -3, \"choice\": \"tie\"}", 400, "positive integer"},
      {"/api/v1/comparisons", "{\"pair_id\": 1.5, \"choice\": \"tie\"}", 400, "positive integer"},
      {"/api/v1/comparisons", "{\"pair_id\": " + pid + ", \"choice\": \"both\"}", 400, "choice"},
      {"/api/v1/comparisons", "{\"pair_id\": " + pid + ", \"choice\": 1}", 400, "choice"},
      {"/api/v1/comparisons", "{\"pair_id\": " + pid + "}", 400, "missing field \"choice\""},
      {"/api/v1/comparisons", "{\"pair_id\": " + pid + ", \"choice\": \"tie\", \"x\": 1}", 400, "unknown field \"x\""},
      {"/api/v1/comparisons", "{\"pair_id\": 999, \"choice\": \"tie\"}", 404, "no such pair"},
      {"/api/v1/comparisons", "{\"pair_id\": " + pid + ", \"choice\": \"\xff\xfe\"}", 400, "not valid JSON"},
      {"/api/v1/comparisons", std::string(200, '[') + std::string(200, ']'), 400, "nests deeper"},
      {"/api/v1/ratings", "{\"pair_id\": " + pid + ", \"response\": \"first\", \"score\": 9}", 400, "score"},
      {"/api/v1/ratings", "{\"pair_id\": " + pid + ", \"response\": \"first\", \"score\": \"5\"}", 400, "must be a number"},
      {"/api/v1/ratings", "{\"pair_id\": " + pid + ", \"response\": \"third\", \"score\": 5}", 400, "response"},
      {"/api/v1/corrections", "{\"pair_id\": " + pid + ", \"response\": \"first\", \"corrected\": \"\"}", 400, "empty"},
      {"/api/v1/corrections", "{\"pair_id\": " + pid + ", \"response\": \"first\", \"corrected\": \"" +
                                  std::string(20000, 'x') + "\"}", 413, "corrected"},
      {"/api/v1/nothing", "{}", 404, "no route"},
  };
  for (const auto& c : cases) {
    const auto [status, error] = post(c.path, c.body);
    EXPECT_EQ(status, c.status) << c.path << " " << c.body.substr(0, 80) << " -> " << error;
    EXPECT_NE(error.find(c.says), std::string::npos) << c.body.substr(0, 80) << " -> " << error;
  }
  // Larger than --max-body: httplib refuses it before reading (413), still with a message.
  const auto [big, big_error] = post("/api/v1/comparisons", std::string(70 * 1024, ' '));
  EXPECT_EQ(big, 413);
  EXPECT_FALSE(big_error.empty());
  const auto [method, method_error] = answer(alice.Get("/api/v1/comparisons"));
  EXPECT_EQ(method, 405);
  EXPECT_NE(method_error.find("POST"), std::string::npos) << method_error;
  const auto [query, query_error] = answer(s.client(kAdmin).Get("/api/v1/export?kind=pairs"));
  EXPECT_EQ(query, 400);
  EXPECT_NE(query_error.find("kind"), std::string::npos) << query_error;
  EXPECT_EQ(s.store.count(store::Family::Comparison), 0u) << "nothing refused was stored";
  EXPECT_EQ(s.client().Get("/healthz")->status, 200) << "the server survived all of it";
}

TEST(FeedbackApi, LimitsTheRateOfEachTokenSeparately) {
  ServiceOptions options;
  options.rate_per_s = 1;  // refills one request a second: the test's burst of 5 cannot be refilled in time
  options.burst = 3;
  Served s(options);
  int ok = 0, limited = 0;
  for (int i = 0; i < 5; ++i) {
    const int status = s.client(kAnnotator).Get("/api/v1/next")->status;
    ok += status == 200;
    limited += status == 429;
  }
  EXPECT_EQ(ok, 3);
  EXPECT_EQ(limited, 2);
  EXPECT_EQ(s.client(kAdmin).Get("/api/v1/next")->status, 200) << "another token has its own bucket";
}

TEST(FeedbackApi, ComparesSecretsWithoutShortCuts) {
  EXPECT_TRUE(constant_time_equal("abcdef", "abcdef"));
  EXPECT_FALSE(constant_time_equal("abcdef", "abcdeg"));
  EXPECT_FALSE(constant_time_equal("abcdef", "abcde"));
  EXPECT_FALSE(constant_time_equal("", "a"));
  EXPECT_TRUE(constant_time_equal("", ""));
}

}  // namespace
}  // namespace moerl::feedback
