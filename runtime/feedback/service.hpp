// The feedback endpoint's request handling, apart from any HTTP library: FeedbackService::handle() takes a
// parsed request and returns the response, so tests and the fuzz test call it directly and the server
// (http_server.hpp) only adapts cpp-httplib to it.
//
// Routes (JSON bodies; every error is {"error": "<what is wrong>"} with a 4xx status):
//   GET  /                     the feedback page (no token: it asks for one)
//   GET  /healthz              "ok"                                              no token
//   GET  /metrics              Prometheus text                                   no token
//   GET  /api/v1/next          {"pair": {...} | null, "judged": n}               annotator or admin
//   POST /api/v1/comparisons   {"pair_id", "choice": "first"|"second"|"tie"}     annotator or admin -> 201
//   POST /api/v1/ratings       {"pair_id", "response": "first"|"second", "score"} annotator or admin -> 201
//   POST /api/v1/corrections   {"pair_id", "response", "corrected"}              annotator or admin -> 201
//   POST /api/v1/pairs         {"prompt", "first", "second", optional "*_ids", "*_policy"}   admin -> 201
//   GET  /api/v1/export?kind=comparisons|ratings|corrections   JSONL             admin
//   GET  /api/v1/config        the limits in force                               admin
// A 201 answer is sent only after the record is durable: the service hands every record it writes (the three
// submissions and the pairs) to a RecordSink (record_sink.hpp) — the feedback collector actor in `moerl
// feedback serve` — and answers when the sink says it is durable; the answer carries the record's key. The
// store itself is only read here (the pairs at construction, export, the record counts of /metrics).
#pragma once
#include <atomic>
#include <chrono>
#include <functional>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "runtime/feedback/record_sink.hpp"
#include "runtime/store/durable_store.hpp"
#include "runtime/store/pair_record.hpp"

namespace moerl::feedback {

struct HttpRequest {
  std::string method;         // "GET", "POST", ...
  std::string path;           // without the query
  std::multimap<std::string, std::string> query;
  std::string authorization;  // the Authorization header, "" when absent
  std::string body;
};

struct HttpResponse {
  int status = 200;
  std::string content_type = "application/json";
  std::string body;
};

enum class Role : uint8_t { Annotator, Admin };

struct TokenEntry {
  Role role = Role::Annotator;
  std::string name;   // the annotator id written into records
  std::string token;  // the bearer secret, >= 16 printable ASCII characters
};

// Reads a tokens file: one entry per line, "annotator NAME TOKEN" or "admin NAME TOKEN"; blank lines and
// lines starting with '#' are skipped. Throws moerl::Error naming the file and line when malformed.
std::vector<TokenEntry> read_tokens(const std::string& path);

struct ServiceOptions {
  size_t max_body_bytes = 64 * 1024;   // larger bodies: 413
  size_t max_text_bytes = 16 * 1024;   // each prompt/response/correction text
  double rate_per_s = 100;             // requests per second per token (token bucket); 0 = no limit
  double burst = 200;                  // bucket size
  float scale_min = 1, scale_max = 7;  // the rating scale offered
};

// Constant-time equality of two secrets: the time depends on their lengths only, not on where they differ.
bool constant_time_equal(std::string_view a, std::string_view b);

class FeedbackService {
 public:
  // Writes through `sink` (kept by reference: it must outlive the service); reads `store`, which must be the
  // store the sink writes.
  FeedbackService(store::DurableStore& store, RecordSink& sink, std::vector<TokenEntry> tokens,
                  ServiceOptions options = {});
  // Writes `store` directly (a StoreSink of its own).
  FeedbackService(store::DurableStore& store, std::vector<TokenEntry> tokens, ServiceOptions options = {});

  // Never throws: any failure becomes a 4xx (the caller's input) or 500 (the store) with a message.
  HttpResponse handle(const HttpRequest& request);
  // The same answer, given to `reply` exactly once: at once for every route but the submissions, whose
  // answer comes from the sink (the store's committer thread, or the collector actor's reply) once the record
  // is durable (no thread waits for the WAL sync meanwhile). Never throws.
  using Reply = std::function<void(HttpResponse)>;
  void handle_async(const HttpRequest& request, Reply reply);

  // Queues a pair to judge (POST /api/v1/pairs, and the in-process preferences stage) through the sink; durable
  // on return (blocks the caller for one commit).
  uint64_t add_pair(store::PairToJudge pair);
  size_t pairs() const;
  const ServiceOptions& options() const { return options_; }

  // Counts a response produced outside handle() (e.g. the HTTP layer's own 413) in the metrics.
  void count_status(int status);

 private:
  // A validated submission, encoded and ready for the store.
  struct Submission {
    store::Family family = store::Family::Comparison;
    std::vector<uint8_t> bytes;
    uint64_t time_ns = 0;
    int counter = 0;         // index into submitted_
    const char* kind = "";   // "comparison", "rating", "correction"
    const TokenEntry* who = nullptr;
  };

  struct Bucket {
    double tokens = 0;
    std::chrono::steady_clock::time_point last;
  };

  void load_pairs();  // the pairs held in the store, at construction
  // With `deferred`, a submission is only prepared into it and the answer has status 0.
  HttpResponse route(const HttpRequest& request, Submission* deferred = nullptr);
  const TokenEntry* authenticate(const HttpRequest& request, HttpResponse& error);
  bool allow(const TokenEntry& who);
  HttpResponse next_pair(const TokenEntry& who);
  Submission prepare(const TokenEntry& who, const std::string& kind, const std::string& body);
  HttpResponse submitted(const Submission& s, const store::Key& key);  // the 201 answer
  HttpResponse post_pair(const std::string& body);
  HttpResponse export_records(const HttpRequest& request);
  HttpResponse config() const;
  std::string metrics() const;

  store::DurableStore& store_;
  std::unique_ptr<RecordSink> own_sink_;  // the StoreSink of the store-only constructor
  RecordSink& sink_;
  std::vector<TokenEntry> tokens_;
  ServiceOptions options_;

  mutable std::shared_mutex pairs_mutex_;
  std::map<uint64_t, store::PairToJudge> pairs_;           // by pair id
  std::unordered_map<std::string, uint64_t> cursor_;       // annotator -> last pair id served
  std::unordered_map<std::string, uint64_t> judged_;       // annotator -> submissions this run
  uint64_t next_pair_id_ = 1;

  std::mutex buckets_mutex_;
  std::unordered_map<std::string, Bucket> buckets_;        // by annotator name

  std::atomic<uint64_t> status_counts_[6] = {};            // by status / 100
  std::atomic<uint64_t> submitted_[3] = {};                // comparisons, ratings, corrections
  std::atomic<uint64_t> rate_limited_{0};
};

}  // namespace moerl::feedback
