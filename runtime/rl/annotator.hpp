// A scripted annotator for the feedback endpoint (`moerl feedback serve`, runtime/feedback/): it takes the
// path a person takes on the web page — GET /api/v1/next with its annotator bearer token, then POST
// /api/v1/comparisons {"pair_id", "choice": "first" | "second" | "tie"} — over real HTTP, so the RLHF quickstart
// collects its preferences unattended through the same API and store a person would use.
#pragma once
#include <cstdint>
#include <functional>
#include <string>

namespace moerl::rl {

// "first", "second" or "tie" for two responses to one prompt.
using PairJudge =
    std::function<std::string(const std::string& prompt, const std::string& first, const std::string& second)>;

struct AnnotatorOptions {
  std::string host = "127.0.0.1";
  int port = 0;
  std::string token;            // an annotator's (or admin's) bearer token from the server's tokens file
  int64_t max_pairs = 0;        // stop after this many judgements (0: until every queued pair is judged once)
  int connections = 8;          // keep-alive connections judging in parallel under the one token (the server's
                                // cursor hands each the next pair; its group commit then fsyncs them together)
  double timeout_s = 600;       // give up (moerl::Error) when the work takes longer
};

struct AnnotatorResult {
  int64_t judged = 0, first = 0, second = 0, ties = 0;
  int64_t rate_limited = 0;     // 429 answers, each retried after a pause
};

// Judges pairs until the server serves a pair it already judged (the queue wraps around), has none, or
// max_pairs is reached. `on_judged(n)` after each judgement (progress; called under a lock). A 4xx/5xx other than 429, or no
// connection, is a moerl::Error naming the route, status and the server's message.
AnnotatorResult annotate_over_http(const AnnotatorOptions& options, const PairJudge& judge,
                                   const std::function<void(int64_t)>& on_judged = {});

}  // namespace moerl::rl
