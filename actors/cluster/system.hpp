// A cluster process's actor system: CAF's middleman over TCP (optionally TLS through libcaf-openssl),
// heartbeats so that a silent peer is declared dead, and the message types of the cluster and its roles.
#pragma once
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include <caf/all.hpp>
#include <caf/io/all.hpp>

#include "actors/cluster/protocol.hpp"

namespace moerl::cluster {

// TLS for every connection of the cluster: all three files, or none (plain TCP). Peers must present a
// certificate signed by `ca`; the head and the nodes may share one certificate.
struct TlsOptions {
  std::string certificate;  // PEM certificate of this process
  std::string key;          // PEM private key of that certificate
  std::string ca;           // PEM file of the authority that signs the cluster's certificates
  bool enabled() const { return !certificate.empty() || !key.empty() || !ca.empty(); }
  // Throws moerl::Error naming the option when only some are set or a file is missing.
  void validate() const;
};

// The idle spin of a host: 200 us with >= 8 hardware threads, else 0. The window covers the gap between the
// events of one round trip (the request out, the answer back: ~50-100 us), so a chain of requests keeps the
// pollers busy and an idle process burns at most 2 x 200 us of CPU per event (heartbeats every 250 ms: ~0.2%
// of a core). On the 2-core VM polling measured 1.5-4x slower round trips (the pollers of two processes take
// the cores that the threads doing the work need), hence off there.
std::chrono::microseconds default_idle_spin();

struct NetOptions {
  TlsOptions tls;
  // BASP heartbeats: a peer silent for `connection_timeout` is declared dead (its actors go down) even when
  // its TCP connection stays open (a hung or partitioned host). A killed process is noticed at once (the
  // kernel closes its sockets).
  std::chrono::milliseconds heartbeat{250};
  std::chrono::milliseconds connection_timeout{2000};
  // CAF's scheduler: "sharing" (one queue, idle workers wait on a condition variable and wake at once) or
  // "stealing" (per-worker queues; idle workers poll briefly, then wait on a condition variable: CAF's
  // 50 us sleeping phase is switched off, see apply_latency_settings). Measured on the 2-core machine under
  // load 8-12, request/response between two processes on loopback: sharing ~210 us median, stealing ~200 us
  // (with CAF's sleeping phase ~500 us; raw TCP ping-pong between two processes: ~20 us there). Cluster
  // processes exchange few, latency-bound messages; heavy roles run detached on their own threads either way.
  std::string scheduler = "sharing";
  // Busy polling after activity (polling_multiplexer.hpp, sharing_policy.hpp): the I/O thread and one idle
  // worker of each process poll for this long after their last event before they block. 0: never poll.
  // Default default_idle_spin(): on for hosts with cores to spare, off on small machines.
  std::chrono::microseconds idle_spin = default_idle_spin();
  // Registers the roles' message types (both ends of a connection need them); the cluster's own are
  // always registered.
  std::function<void(caf::actor_system_config&)> register_types;
};

// Owns a config and the actor system built from it (the system keeps a reference to its config).
class ClusterSystem {
 public:
  explicit ClusterSystem(const NetOptions& options);
  ~ClusterSystem();
  caf::actor_system& system() { return *system_; }
  const NetOptions& options() const { return options_; }

  // Publishes `head` on host:port (port 0: a free one); returns the port.
  caf::expected<uint16_t> publish(const head_actor& head, uint16_t port, const std::string& host);
  // Connects to the head published at host:port.
  caf::expected<head_actor> connect(const std::string& host, uint16_t port);

 private:
  NetOptions options_;
  std::unique_ptr<caf::actor_system_config> config_;
  std::unique_ptr<caf::actor_system> system_;
};

// The CAF settings of every cluster process that cut the latency of a request between processes (reasons and
// measurements beside them in system.cpp): the middleman's I/O thread is a PollingMultiplexer; received messages deserialized on the multiplexer thread
// (middleman.workers = 0); for `scheduler` "sharing" CAF's work sharing with idle workers signalled outside the
// queue's lock (SharingCoordinator), for "stealing" no unsignalled sleeping phase of idle workers; sets
// scheduler.policy. Throws moerl::Error for a scheduler other than "sharing" or "stealing".
// `idle_spin` > 0: the I/O thread (and, with "sharing", one idle worker) polls that long before blocking.
void apply_latency_settings(caf::actor_system_config& cfg, const std::string& scheduler,
                            std::chrono::microseconds idle_spin);

// "host:port" -> (host, port); throws moerl::Error naming `what` (e.g. "--join") when malformed.
std::pair<std::string, uint16_t> parse_endpoint(const std::string& text, const std::string& what);

}  // namespace moerl::cluster
