// A closed-loop HTTP/1.1 load generator for the feedback endpoint: `connections` keep-alive connections on
// one epoll thread, each sending its next request as soon as the previous answer is complete. Used by
// `moerl bench feedback` (from its own process) and the crash test; nothing here links to the server.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace moerl::feedback {

struct LoadOptions {
  std::string host = "127.0.0.1";
  int port = 0;
  int connections = 32;
  double seconds = 5;                 // stop sending after this long (in-flight requests still complete)
  std::string method = "POST", path = "/api/v1/comparisons";
  std::vector<std::string> tokens;    // bearer tokens, connection i uses tokens[i % size]
  std::function<std::string(uint64_t)> body;  // the body of request n
  bool keep_keys = false;             // keep the "key" of every 201 answer
};

struct LoadResult {
  uint64_t sent = 0;
  uint64_t acknowledged = 0;          // 201 answers
  uint64_t other_status = 0;          // complete answers with another status
  uint64_t lost_connections = 0;      // connections closed with a request in flight
  double seconds = 0;                 // from the first request to the last answer
  std::vector<double> latency_ms;     // one per complete answer
  std::vector<std::string> keys;      // with keep_keys
};

// Throws moerl::Error when no connection can be opened.
LoadResult run_load(const LoadOptions& options);

double percentile(std::vector<double> values, double q);  // q in [0, 1]; nearest rank

}  // namespace moerl::feedback
