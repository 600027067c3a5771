// Durability under SIGKILL: `moerl feedback serve` (a child process on a free loopback port) takes
// submissions from 16 keep-alive connections and is killed mid-load, 20 times over the same store. Each
// kill lands once the server has acknowledged at least 200 submissions of the round (read from /metrics),
// plus a random 0-50 ms, so every round kills a server with commits in flight. After each kill the store
// is opened here: every submission the server acknowledged (201, with its key) must be in it and decode.
// Unacknowledged ones may or may not be there.
#include <gtest/gtest.h>
#include <httplib.h>
#include <signal.h>
#include <sys/wait.h>

#include <chrono>
#include <future>
#include <random>

#include "runtime/feedback/load_client.hpp"
#include "runtime/feedback/server_process.hpp"
#include "runtime/messages/codec.hpp"
#include "runtime/store/durable_store.hpp"
#include "tests/feedback/temp_dir.hpp"

namespace moerl::feedback {
namespace {

// Kills the server when a failed assertion leaves the scope early.
struct Killer {
  ServerProcess server;
  ~Killer() {
    if (server.pid > 0) stop_server(server, SIGKILL);
  }
};

// The server's count of durable comparisons, from /metrics; 0 when it does not answer.
uint64_t submissions(int port) {
  httplib::Client client("127.0.0.1", port);
  client.set_read_timeout(2);
  const auto r = client.Get("/metrics");
  if (!r || r->status != 200) return 0;
  const std::string name = "moerl_feedback_submissions_total{kind=\"comparison\"} ";
  const size_t at = r->body.find(name);
  return at == std::string::npos ? 0 : std::stoull(r->body.substr(at + name.size()));
}

store::Key parse_key(const std::string& s) {
  const size_t dash = s.find('-');
  return store::Key{std::stoull(s.substr(0, dash)), std::stoull(s.substr(dash + 1))};
}

TEST(FeedbackCrash, KeepsEveryAcknowledgedSubmissionAcrossTwentySigkillsUnderLoad) {
  test::TempDir dir;
  const std::string admin = "admin-token-0123456789abcdef";
  const auto annotators = write_test_tokens(dir.path() + "/tokens", admin, 16);
  const std::string db = dir.path() + "/db";
  constexpr int kKills = 20;
  std::mt19937 rng(7);
  uint64_t acknowledged = 0, found = 0, stored_before = 0;
  const auto start = std::chrono::steady_clock::now();
  for (int round = 0; round < kKills; ++round) {
    Killer guard{start_server(MOERL_BINARY, db, dir.path() + "/tokens", {"--rate-limit", "0"})};
    const ServerProcess server = guard.server;
    if (round == 0) {
      httplib::Client client("127.0.0.1", server.port);
      client.set_bearer_token_auth(admin.c_str());
      const auto r = client.Post("/api/v1/pairs", R"({"prompt": "p", "first": "a", "second": "b"})", "application/json");
      ASSERT_TRUE(r && r->status == 201);
    }
    LoadOptions load;
    load.port = server.port;
    load.connections = 16;
    load.seconds = 30;  // ends when the server dies
    load.tokens = annotators;
    load.keep_keys = true;
    load.body = [](uint64_t n) { return std::string("{\"pair_id\": 1, \"choice\": \"") + (n % 2 ? "first" : "second") + "\"}"; };
    auto running = std::async(std::launch::async, [&] { return run_load(load); });
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (submissions(server.port) < 200 && std::chrono::steady_clock::now() < give_up)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    std::this_thread::sleep_for(std::chrono::milliseconds(rng() % 50));
    guard.server.pid = -1;
    const int status = stop_server(server, SIGKILL);
    ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
    const LoadResult result = running.get();
    ASSERT_GT(result.acknowledged, 0u) << "round " << round << ": the load never got through";
    ASSERT_EQ(result.keys.size(), result.acknowledged);

    store::DurableStore store(db);  // the restart: RocksDB recovers from the WAL
    for (const auto& k : result.keys) {
      const auto value = store.get(store::Family::Comparison, parse_key(k));
      if (!value) continue;
      try {
        msg::decode_comparison(*value);
        ++found;
      } catch (const std::exception& e) {
        ADD_FAILURE() << "round " << round << ": record " << k << " does not decode: " << e.what();
      }
    }
    acknowledged += result.acknowledged;
    EXPECT_GE(store.count(store::Family::Comparison), stored_before + result.acknowledged);
    stored_before = store.count(store::Family::Comparison);
  }
  std::printf("[ crash    ] kills %d, acknowledged %llu, found %llu (in %.1f s)\n", kKills,
              static_cast<unsigned long long>(acknowledged), static_cast<unsigned long long>(found),
              std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  EXPECT_EQ(found, acknowledged) << "acknowledged submissions lost or unreadable after a SIGKILL";
}

}  // namespace
}  // namespace moerl::feedback
