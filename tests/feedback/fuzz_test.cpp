// Fuzz of the request handlers: 10^6 requests built by mutating valid ones (methods, paths, tokens, query
// strings and bodies: byte flips, truncations, insertions of JSON fragments, type swaps) go straight to
// FeedbackService::handle(). Each must get a well-formed answer — 2xx, or 4xx with an "error" message;
// never a 5xx, a crash or another exception — and every record in the store must decode afterwards.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <random>

#include "runtime/feedback/service.hpp"
#include "runtime/messages/codec.hpp"
#include "runtime/store/pair_record.hpp"
#include "tests/feedback/temp_dir.hpp"

namespace moerl::feedback {
namespace {

const std::string kAdmin = "admin-secret-0123456789";
const std::string kAnnotator = "annotator-secret-0123456789";

const char* const kFragments[] = {"{", "}", "[", "]", "\"", ":", ",", "null", "true", "-1", "0", "1e309",
                                  "18446744073709551616", "\"pair_id\"", "\"choice\"", "\"first\"", "\"tie\"",
                                  "\"score\"", "\\u0000", "\\ud800", "\xff", "\xc3\xa9", "{\"version\":1}",
                                  "\"corrected\"", "\"response\"", "1.5", "[]", "{}", "\"prompt\""};

std::string mutate(std::string s, std::mt19937_64& rng) {
  const int edits = 1 + static_cast<int>(rng() % 4);
  for (int e = 0; e < edits; ++e) {
    const size_t at = s.empty() ? 0 : rng() % (s.size() + 1);
    switch (rng() % 6) {
      case 0:  // flip a byte
        if (!s.empty()) s[std::min(at, s.size() - 1)] = static_cast<char>(rng());
        break;
      case 1:  // truncate
        s.resize(at);
        break;
      case 2:  // insert a JSON fragment
        s.insert(at, kFragments[rng() % std::size(kFragments)]);
        break;
      case 3:  // delete a run
        s.erase(at, rng() % 8);
        break;
      case 4:  // duplicate a slice
        s.insert(at, s.substr(rng() % (s.size() + 1), rng() % 16));
        break;
      default:  // random bytes
        for (int i = 0; i < 4; ++i) s.insert(s.begin() + static_cast<ptrdiff_t>(std::min(at, s.size())), static_cast<char>(rng()));
    }
  }
  return s;
}

TEST(FeedbackFuzz, AMillionMutatedRequestsGetWellFormedAnswersAndLeaveTheStoreReadable) {
  test::TempDir dir;
  store::StoreOptions store_options;
  store_options.sync = false;  // durability is the crash test's subject; this one is about parsing
  store::DurableStore store(dir.path(), store_options);
  ServiceOptions options;
  options.rate_per_s = 0;  // the limiter would answer most requests 429 before they reach validation
  FeedbackService service(store, {{Role::Admin, "boss", kAdmin}, {Role::Annotator, "alice", kAnnotator}}, options);
  store::PairToJudge pair;
  pair.prompt.text = "p";
  pair.first.text = "a";
  pair.second.text = "b";
  service.add_pair(pair);

  const std::vector<std::pair<std::string, std::string>> seeds = {
      {"/api/v1/comparisons", R"({"pair_id": 1, "choice": "first"})"},
      {"/api/v1/ratings", R"({"pair_id": 1, "response": "second", "score": 4.5})"},
      {"/api/v1/corrections", R"({"pair_id": 1, "response": "first", "corrected": "better"})"},
      {"/api/v1/pairs", R"({"prompt": "q", "first": "x", "second": "y", "first_ids": [1, 2], "second_policy": {"version": 2, "step": 3}})"},
      {"/api/v1/next", ""},
      {"/api/v1/export", ""},
      {"/api/v1/config", ""},
      {"/metrics", ""},
      {"/healthz", ""},
  };
  const char* const methods[] = {"GET", "POST", "PUT", "DELETE", "get", ""};
  const std::string auths[] = {"Bearer " + kAnnotator, "Bearer " + kAdmin, "Bearer " + kAnnotator.substr(1), "",
                               "Basic abc", "Bearer ", "bearer " + kAdmin};
  std::mt19937_64 rng(20261128);
  constexpr int kInputs = 1000000;
  int counts[6] = {};
  for (int i = 0; i < kInputs; ++i) {
    const auto& [path, body] = seeds[rng() % seeds.size()];
    HttpRequest r;
    const bool right_method = rng() % 8 != 0;
    r.method = right_method ? (body.empty() ? "GET" : "POST") : methods[rng() % std::size(methods)];
    r.path = rng() % 16 == 0 ? mutate(path, rng) : path;
    r.authorization = auths[rng() % 3 == 0 ? rng() % std::size(auths) : rng() % 2];
    r.body = rng() % 8 == 0 ? body : mutate(body, rng);
    if (rng() % 8 == 0) r.query.emplace(rng() % 2 ? "kind" : mutate("x", rng), rng() % 2 ? "comparisons" : mutate("ratings", rng));
    if (path == "/api/v1/export" && i % 50000 != 0) r.path = "/api/v1/next";  // an export walks the whole store: 20 of them
    const HttpResponse a = service.handle(r);
    ASSERT_TRUE(a.status >= 200 && a.status < 500) << a.status << " " << a.body << " for " << r.method << " " << r.path
                                                    << " " << r.body;
    ++counts[a.status / 100];
    if (a.status >= 400) {
      const auto j = nlohmann::json::parse(a.body, nullptr, false);
      ASSERT_TRUE(j.is_object() && j.contains("error") && !j["error"].get<std::string>().empty()) << a.body;
    }
  }
  // Both kinds of answer must occur, or the mutations missed the valid paths (or never left them).
  EXPECT_GT(counts[2], 1000);
  EXPECT_GT(counts[4], 100000);
  const auto check = [&](store::Family f, auto decode) {
    uint64_t n = 0;
    store.scan(f, 0, UINT64_MAX, [&](const store::Key&, std::span<const uint8_t> b) {
      EXPECT_NO_THROW(decode(b));
      ++n;
      return true;
    });
    EXPECT_EQ(n, store.count(f));
  };
  check(store::Family::Comparison, [](auto b) { return msg::decode_comparison(b); });
  check(store::Family::Rating, [](auto b) { return msg::decode_rating(b); });
  check(store::Family::Correction, [](auto b) { return msg::decode_correction(b); });
  check(store::Family::Pair, [](auto b) { return store::decode_pair(b); });
}

}  // namespace
}  // namespace moerl::feedback
