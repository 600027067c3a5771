// moerl feedback serve --db DIR --port N --tokens FILE: the feedback endpoint and page (runtime/feedback/) in
// front of a feedback collector actor (every submission goes through it: actors/roles/feedback_sink.hpp), and
// the `moerl bench feedback` load process.
#include <CLI/CLI.hpp>
#include <httplib.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "actors/cli/commands.hpp"
#include "actors/cli/feedback.hpp"
#include "actors/roles/feedback_sink.hpp"
#include "runtime/error.hpp"
#include "runtime/feedback/http_server.hpp"
#include "runtime/feedback/load_client.hpp"
#include "runtime/feedback/server_process.hpp"
#include "runtime/feedback/service.hpp"

namespace moerl::cli {
namespace {

struct ServeArgs {
  std::string db, tokens, host = "127.0.0.1";
  int port = 8080, threads = 128;
  feedback::ServiceOptions service;
};

int serve(const ServeArgs& a) {
  // SIGINT/SIGTERM end the server cleanly (the store closes); blocked here so every thread inherits the mask
  // and only the waiter below receives them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  auto tokens = feedback::read_tokens(a.tokens);
  // Declared in this order so they end in the reverse one: the server (answers what is in flight), the service,
  // the sink (stops the collector), the actor system, then the store the collector wrote.
  const auto store = std::make_shared<store::DurableStore>(a.db);
  caf::actor_system_config config;
  actors::add_message_types(config);
  // The endpoint's two actors (the sink's bridge and the collector) wait on the HTTP loop and the WAL, not on
  // the CPU. CAF's default workers (one per core) poll for work, waking every 50 us for 25 ms after each job:
  // that cost more CPU than the submissions (bench feedback, 2 cores: 2-4x the server's CPU per submission).
  // One worker that sleeps on its condition variable as soon as its queue is empty.
  config.set("scheduler.max-threads", int64_t{1});
  config.set("work-stealing.aggressive-poll-attempts", int64_t{1});
  config.set("work-stealing.moderate-poll-attempts", int64_t{0});
  caf::actor_system system{config};
  const auto sink = actors::collector_sink(system, store, "feedback/serve");
  feedback::FeedbackService service(*store, *sink, std::move(tokens), a.service);
  feedback::HttpServer server(service, a.threads);
  const int port = server.bind(a.host, a.port);
  std::printf("listening on http://%s:%d\n", a.host.c_str(), port);
  std::fflush(stdout);
  std::thread waiter([&] {
    int sig = 0;
    sigwait(&signals, &sig);
    server.stop();
  });
  server.run();
  pthread_kill(waiter.native_handle(), SIGTERM);  // when run() ended for another reason
  waiter.join();
  return 0;
}

std::string read_admin_token(const std::string& tokens_file, std::vector<std::string>& annotators) {
  std::string admin;
  for (const auto& e : feedback::read_tokens(tokens_file)) {
    if (e.role == feedback::Role::Admin) admin = e.token;
    else annotators.push_back(e.token);
  }
  require(!admin.empty() && !annotators.empty(), tokens_file + ": the benchmark needs an admin and an annotator token");
  return admin;
}

}  // namespace

void run_feedback_benchmark(bench::Report& report, const std::string& url, const std::string& tokens_file) {
  namespace fs = std::filesystem;
  // 128 keep-alive clients: ~128 submissions join each WAL sync (a few ms on this disk), enough for 20k/s;
  // 16 annotator tokens (connection i uses token i % 16): each request compares against every token.
  constexpr int kConnections = 128, kTokens = 16, kPairs = 16;
  constexpr double kWarmup = 1.0, kSeconds = 5.0;
  std::string temp;
  feedback::ServerProcess child;
  std::string host = "127.0.0.1";
  int port = 0;
  std::vector<std::string> annotators;
  std::string admin;
  if (url.empty()) {
    temp = (fs::temp_directory_path() / ("moerl-bench-feedback-" + std::to_string(::getpid()))).string();
    fs::create_directories(temp);
    admin = "admin-token-0123456789abcdef";
    annotators = feedback::write_test_tokens(temp + "/tokens", admin, kTokens);
    child = feedback::start_server(fs::read_symlink("/proc/self/exe").string(), temp + "/db", temp + "/tokens",
                                   {"--rate-limit", "0"});
    port = child.port;
  } else {
    const auto colon = url.rfind(':');
    require(url.rfind("http://", 0) == 0 && colon > 7, "--url " + url + ": expected http://HOST:PORT");
    host = url.substr(7, colon - 7);
    port = std::stoi(url.substr(colon + 1));
    require(!tokens_file.empty(), "--url needs --tokens FILE with the server's admin and annotator tokens");
    admin = read_admin_token(tokens_file, annotators);
  }
  httplib::Client client(host, port);
  client.set_bearer_token_auth(admin.c_str());
  for (int i = 0; i < kPairs; ++i) {
    const nlohmann::json pair = {{"prompt", "Benchmark prompt " + std::to_string(i)},
                                 {"first", "A first response of moderate length for the benchmark."},
                                 {"second", "A second response, a little different from the first one."}};
    const auto r = client.Post("/api/v1/pairs", pair.dump(), "application/json");
    require(r && r->status == 201, "bench feedback: queuing a pair failed" + (r ? ": " + r->body : std::string()));
  }
  feedback::LoadOptions load;
  load.host = host;
  load.port = port;
  load.connections = kConnections;
  load.tokens = annotators;
  const char* choices[] = {"first", "second", "tie"};
  load.body = [&](uint64_t n) {
    return "{\"pair_id\":" + std::to_string(1 + n % kPairs) + ",\"choice\":\"" + choices[n % 3] + "\"}";
  };
  load.seconds = kWarmup;
  feedback::run_load(load);
  load.seconds = kSeconds;
  const auto result = feedback::run_load(load);
  double load_average = 0;
  std::ifstream("/proc/loadavg") >> load_average;
  const auto metrics = client.Get("/metrics");
  if (child.pid > 0) {
    feedback::stop_server(child, SIGTERM);
    fs::remove_all(temp);
  }
  require(result.acknowledged > 0, "bench feedback: no submission was acknowledged");
  const nlohmann::json extra = {{"connections", kConnections},
                                {"seconds", result.seconds},
                                {"acknowledged", result.acknowledged},
                                {"other_status", result.other_status},
                                {"durability", "WAL fsync before the 201 answer (group commit)"},
                                {"loadavg_1min", load_average}};
  report.add("feedback", "durable_submissions_per_s", static_cast<double>(result.acknowledged) / result.seconds,
             "submissions/s", "mean", extra);
  report.add("feedback", "latency_p50_ms", feedback::percentile(result.latency_ms, 0.5), "ms", "p50", extra);
  report.add("feedback", "latency_p99_ms", feedback::percentile(result.latency_ms, 0.99), "ms", "p99", extra);
}

void add_feedback_command(CLI::App& app, std::function<int()>& action) {
  auto* cmd = app.add_subcommand("feedback", "Human feedback: the endpoint and page where people judge responses.");
  cmd->require_subcommand(1);
  auto* srv = cmd->add_subcommand("serve", "Serve the feedback API and page; records go to a RocksDB store, "
                                           "each acknowledged only once durable.");
  auto args = std::make_shared<ServeArgs>();
  srv->add_option("--db", args->db, "Store folder (created when missing)")->required();
  srv->add_option("--port", args->port, "TCP port; 0 picks a free one (printed)")->check(CLI::Range(0, 65535));
  srv->add_option("--tokens", args->tokens, "Tokens file: lines \"annotator|admin NAME TOKEN\"")->required()->check(CLI::ExistingFile);
  srv->add_option("--host", args->host, "Interface to listen on");
  srv->add_option("--threads", args->threads, "Ignored (kept for old scripts): one event loop serves every connection")
      ->check(CLI::Range(2, 4096));
  srv->add_option("--rate-limit", args->service.rate_per_s, "Requests per second per token; 0 = no limit")->check(CLI::Range(0.0, 1e9));
  srv->add_option("--burst", args->service.burst, "Requests a token may send at once above the rate")->check(CLI::Range(1.0, 1e9));
  srv->add_option("--max-body", args->service.max_body_bytes, "Largest request body in bytes")->check(CLI::Range(1024, 1 << 24));
  srv->callback([args, &action] { action = [args] { return serve(*args); }; });
}

}  // namespace moerl::cli
