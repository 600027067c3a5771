// `moerl feedback serve` (registered from main.cpp) and `moerl bench feedback`: durable submissions per
// second and latency from this (load) process against a `moerl feedback serve` — started here on a free
// loopback port with a temporary store, or at `url`.
#pragma once
#include <functional>
#include <string>

#include "bench/report.hpp"

namespace CLI { class App; }

namespace moerl::cli {

void add_feedback_command(CLI::App& app, std::function<int()>& action);

// url: "" (start a server) or "http://HOST:PORT" with `tokens_file` holding its admin and annotator tokens.
void run_feedback_benchmark(bench::Report& report, const std::string& url, const std::string& tokens_file);

}  // namespace moerl::cli
