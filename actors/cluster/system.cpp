#include "actors/cluster/system.hpp"

#include <filesystem>
#include <thread>

#include <caf/openssl/all.hpp>

#include "actors/cluster/polling_multiplexer.hpp"
#include "actors/cluster/sharing_policy.hpp"
#include "runtime/error.hpp"

namespace moerl::cluster {

void TlsOptions::validate() const {
  if (!enabled()) return;
  const std::pair<const char*, const std::string*> files[] = {
      {"--tls-cert", &certificate}, {"--tls-key", &key}, {"--tls-ca", &ca}};
  for (const auto& [flag, file] : files) {
    require(!file->empty(), std::string(flag) + ": TLS needs --tls-cert, --tls-key and --tls-ca together");
    require(std::filesystem::is_regular_file(*file), std::string(flag) + " " + *file + ": file not found");
  }
}

std::chrono::microseconds default_idle_spin() {
  return std::thread::hardware_concurrency() >= 8 ? std::chrono::microseconds{200} : std::chrono::microseconds{0};
}

SharingCoordinator::SharingCoordinator(caf::actor_system& sys)
    : QuietClockCoordinator<SignalAfterUnlockSharing>(sys),
      spin_(caf::get_or(sys.config(), "moerl.idle-spin-us", int64_t{0})) {}

// A request to an actor of another process and its answer pass through a chain of threads: the sender's
// worker, its multiplexer (woken through a pipe), the socket, the receiver's multiplexer, a worker there, and
// the same way back. Each hand-off to a sleeping thread costs a wake-up and a context switch, ~10-15 us of CPU
// on the 2-core VM, where a loaded machine runs the whole chain on one core: the round trip is the sum of
// these hand-offs, so the settings below remove the ones that CAF's defaults add.
void apply_latency_settings(caf::actor_system_config& cfg, const std::string& scheduler,
                            std::chrono::microseconds idle_spin) {
  require(idle_spin.count() >= 0 && idle_spin.count() <= 100000,
          "idle spin " + std::to_string(idle_spin.count()) + " us: expected 0..100000");
  // Read by the PollingMultiplexer that ClusterSystem loads as the middleman's backend, and by the
  // SharingCoordinator. A key of our own, so put into the settings directly (cfg.set refuses unknown options).
  caf::put(cfg.content, "moerl.idle-spin-us", static_cast<int64_t>(idle_spin.count()));
  // Received messages are deserialized on the multiplexer thread, which enqueues them to their actor at once.
  // CAF's default (middleman.workers = 1 on this 2-core machine, more on larger ones) hands each received
  // message to a scheduler job that deserializes and enqueues it: one more wake-up per message in every process.
  // Cost: a large message is decoded on the I/O thread and delays the process's other connections for that
  // long; the cluster's messages are small (commands, Cap'n Proto envelopes; tensors go through the data plane).
  // Measured (bench/results/2026-11-29-actors-cpu-*.jsonl, load 8-12 on 2 cores): 19 -> 11 context switches
  // per round trip, median 255 -> 210 us.
  cfg.set("middleman.workers", int64_t{0});
  if (scheduler == "sharing") {
    // CAF's work sharing, with the wake-up of an idle worker moved out of the queue's lock (sharing_policy.hpp).
    // Both schedulers use the quiet actor clock (quiet_clock.hpp): a timed request does not wake a timer thread.
    // A scheduler module loaded by the config replaces the one that scheduler.policy would pick.
    cfg.set("scheduler.policy", caf::atom("sharing"));
    cfg.module_factories.push_back(
        [](caf::actor_system& sys) -> caf::actor_system::module* { return new SharingCoordinator(sys); });
    return;
  }
  require(scheduler == "stealing", "scheduler \"" + scheduler + "\": expected sharing or stealing");
  cfg.set("scheduler.policy", caf::atom("stealing"));
  cfg.module_factories.push_back(
      [](caf::actor_system& sys) -> caf::actor_system::module* { return new StealingCoordinator(sys); });
  // Work stealing: an idle CAF worker polls its queue 100 times, then 500 times with a 50 us sleep in
  // between that no enqueue interrupts (a message for it waits out the sleep: 60-110 us per hop with the
  // kernel's timer slack), then waits on a condition variable that an enqueue signals. Without the sleeping
  // phase an idle worker goes from the short poll straight to the signalled wait: ~500 -> ~200 us per round
  // trip. The workers never poll here (the idle spin polls only the I/O thread with this scheduler).
  cfg.set("work-stealing.moderate-poll-attempts", int64_t{0});
  // TCP_NODELAY: CAF sets it already.
}

ClusterSystem::ClusterSystem(const NetOptions& options) : options_(options) {
  options_.tls.validate();
  config_ = std::make_unique<caf::actor_system_config>();
  caf::actor_system_config& cfg = *config_;
  // CAF's middleman with its default epoll multiplexer replaced by one that polls after activity.
  cfg.load<caf::io::middleman, PollingMultiplexer>();
  if (options_.tls.enabled()) {
    cfg.load<caf::openssl::manager>();
    cfg.openssl_certificate = options_.tls.certificate;
    cfg.openssl_key = options_.tls.key;
    cfg.openssl_cafile = options_.tls.ca;
  }
  cfg.set("middleman.heartbeat-interval", caf::timespan{options_.heartbeat});
  cfg.set("middleman.connection-timeout", caf::timespan{options_.connection_timeout});
  apply_latency_settings(cfg, options_.scheduler, options_.idle_spin);
  register_cluster_types(cfg);
  if (options_.register_types) options_.register_types(cfg);
  system_ = std::make_unique<caf::actor_system>(cfg);
}

ClusterSystem::~ClusterSystem() = default;

caf::expected<uint16_t> ClusterSystem::publish(const head_actor& head, uint16_t port, const std::string& host) {
  const char* in = host.empty() ? nullptr : host.c_str();
  if (options_.tls.enabled()) return caf::openssl::publish(head, port, in, true);
  return system_->middleman().publish(head, port, in, true);
}

caf::expected<head_actor> ClusterSystem::connect(const std::string& host, uint16_t port) {
  if (options_.tls.enabled()) return caf::openssl::remote_actor<head_actor>(*system_, host, port);
  return system_->middleman().remote_actor<head_actor>(host, port);
}

std::pair<std::string, uint16_t> parse_endpoint(const std::string& text, const std::string& what) {
  const size_t colon = text.rfind(':');
  require(colon != std::string::npos && colon > 0 && colon + 1 < text.size(),
          what + " " + text + ": expected HOST:PORT, e.g. 127.0.0.1:7400");
  const std::string port_text = text.substr(colon + 1);
  size_t used = 0;
  long port = -1;
  try {
    port = std::stol(port_text, &used);
  } catch (...) {
  }
  require(used == port_text.size() && port > 0 && port < 65536,
          what + " " + text + ": the port must be a number in 1..65535");
  return {text.substr(0, colon), static_cast<uint16_t>(port)};
}

}  // namespace moerl::cluster
