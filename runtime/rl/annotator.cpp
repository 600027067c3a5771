#include "runtime/rl/annotator.hpp"

#include <httplib.h>

#include <chrono>
#include <exception>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>
#include <vector>

#include "runtime/error.hpp"

namespace moerl::rl {
namespace {

using Clock = std::chrono::steady_clock;

// One request, retried after a pause while the server answers 429 (its per-token rate limit).
httplib::Result request(httplib::Client& client, const AnnotatorOptions& o, const std::string& method,
                        const std::string& path, const std::string& body, AnnotatorResult& r, Clock::time_point t0) {
  const httplib::Headers headers{{"Authorization", "Bearer " + o.token}};
  for (;;) {
    httplib::Result res = method == "GET" ? client.Get(path, headers)
                                          : client.Post(path, headers, body, "application/json");
    require(static_cast<bool>(res), "annotator: " + method + " http://" + o.host + ":" + std::to_string(o.port) +
                                        path + " failed: " + httplib::to_string(res.error()));
    if (res->status != 429) return res;
    ++r.rate_limited;
    require(std::chrono::duration<double>(Clock::now() - t0).count() < o.timeout_s,
            "annotator: still rate limited after " + std::to_string(o.timeout_s) + " s");
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

void expect_status(const httplib::Result& res, int status, const std::string& what) {
  if (res->status == status) return;
  std::string message = res->body;
  try {
    message = nlohmann::json::parse(res->body).at("error").get<std::string>();
  } catch (const std::exception&) {
  }
  throw Error("annotator: " + what + " answered " + std::to_string(res->status) + " (expected " +
              std::to_string(status) + "): " + message.substr(0, 200));
}

}  // namespace

AnnotatorResult annotate_over_http(const AnnotatorOptions& o, const PairJudge& judge,
                                   const std::function<void(int64_t)>& on_judged) {
  require(o.port > 0 && !o.token.empty(), "annotator: needs the server's port and an annotator token");
  require(o.connections >= 1, "annotator: connections must be >= 1");
  AnnotatorResult r;
  std::mutex mutex;  // guards r, seen, done and the first error
  std::set<uint64_t> seen;
  bool done = false;
  std::exception_ptr error;
  const auto t0 = Clock::now();
  auto work = [&] {
    try {
      httplib::Client client(o.host, o.port);
      client.set_keep_alive(true);
      client.set_read_timeout(std::chrono::seconds(30));
      AnnotatorResult mine;  // this connection's 429 count
      for (;;) {
        {
          std::lock_guard lock(mutex);
          if (done || (o.max_pairs > 0 && r.judged >= o.max_pairs)) return;
        }
        require(std::chrono::duration<double>(Clock::now() - t0).count() < o.timeout_s,
                "annotator: not done after " + std::to_string(o.timeout_s) + " s");
        const auto next = request(client, o, "GET", "/api/v1/next", "", mine, t0);
        expect_status(next, 200, "GET /api/v1/next");
        const nlohmann::json j = nlohmann::json::parse(next->body);
        const nlohmann::json& pair = j.at("pair");
        const uint64_t id = pair.is_null() ? 0 : pair.at("pair_id").get<uint64_t>();
        {
          std::lock_guard lock(mutex);
          r.rate_limited += mine.rate_limited;
          mine.rate_limited = 0;
          // No pair, or one already judged: the server's queue wrapped around, every pair is judged.
          if (id == 0 || !seen.insert(id).second) {
            done = true;
            return;
          }
        }
        const std::string choice = judge(pair.at("prompt").get<std::string>(), pair.at("first").get<std::string>(),
                                         pair.at("second").get<std::string>());
        require(choice == "first" || choice == "second" || choice == "tie",
                "annotator: the judge returned \"" + choice + "\"; expected first, second or tie");
        const auto posted = request(client, o, "POST", "/api/v1/comparisons",
                                    nlohmann::json{{"pair_id", id}, {"choice", choice}}.dump(), mine, t0);
        expect_status(posted, 201, "POST /api/v1/comparisons");
        std::lock_guard lock(mutex);
        ++r.judged;
        (choice == "first" ? r.first : choice == "second" ? r.second : r.ties) += 1;
        if (on_judged) on_judged(r.judged);
      }
    } catch (...) {
      std::lock_guard lock(mutex);
      if (!error) error = std::current_exception();
      done = true;
    }
  };
  std::vector<std::thread> threads;
  for (int c = 0; c < o.connections; ++c) threads.emplace_back(work);
  for (auto& t : threads) t.join();
  if (error) std::rethrow_exception(error);
  return r;
}

}  // namespace moerl::rl
