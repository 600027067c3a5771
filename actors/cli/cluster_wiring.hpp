// What `moerl head` and `moerl node` can run: the role catalog and the message types of those roles. Both
// commands use the same wiring, so every process of a cluster offers the same kinds and understands the
// same messages.
#pragma once
#include <CLI/CLI.hpp>
#include <caf/all.hpp>

#include "actors/cluster/actor_roles.hpp"
#include "actors/cluster/catalog.hpp"
#include "actors/cluster/record_roles.hpp"
#include "actors/cluster/system.hpp"
#include "actors/cluster/train_roles.hpp"
#include "actors/envelope.hpp"

namespace moerl::cli {

inline cluster::RoleCatalog cluster_role_catalog() {
  cluster::RoleCatalog catalog;
  cluster::add_cluster_roles(catalog);
  cluster::add_train_roles(catalog);
  cluster::add_actor_roles(catalog);
  cluster::add_record_roles(catalog);  // feedback collector and replay buffer on RocksDB stores
  return catalog;
}

inline void register_cluster_role_types(caf::actor_system_config& cfg) {
  cluster::register_train_role_types(cfg);
  actors::add_message_types(cfg);
}

// Flags shared by both commands: TLS and heartbeats, stored into `net`.
inline void add_net_flags(CLI::App* cmd, cluster::NetOptions& net, int64_t& heartbeat_ms, int64_t& timeout_ms) {
  cmd->add_option("--tls-cert", net.tls.certificate, "TLS: this process's PEM certificate (with --tls-key, --tls-ca)");
  cmd->add_option("--tls-key", net.tls.key, "TLS: the certificate's PEM private key");
  cmd->add_option("--tls-ca", net.tls.ca,
                  "TLS: PEM file of the authority whose certificates the cluster accepts (peers without one are "
                  "refused)");
  cmd->add_option("--scheduler", net.scheduler,
                  "CAF scheduler: sharing (idle workers wake at once: lower latency) or stealing (CAF's default)")
      ->check(CLI::IsMember({"sharing", "stealing"}))
      ->capture_default_str();
  cmd->add_option_function<int64_t>(
         "--idle-spin-us", [&net](int64_t us) { net.idle_spin = std::chrono::microseconds{us}; },
         "Busy polling after activity: the I/O thread and one idle worker poll this long before they block "
         "(lower latency between processes, at most that much CPU per event; 0: never). Default: 200 with 8 or "
         "more hardware threads, else 0")
      ->check(CLI::Range(0, 100000));
  cmd->add_option("--heartbeat-ms", heartbeat_ms, "Interval of heartbeats between cluster processes")
      ->check(CLI::Range(10, 60000));
  cmd->add_option("--timeout-ms", timeout_ms,
                  "A peer silent this long is declared dead (a killed process is noticed at once)")
      ->check(CLI::Range(100, 600000));
}

}  // namespace moerl::cli
