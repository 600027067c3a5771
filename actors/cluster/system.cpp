#include "actors/cluster/system.hpp"

#include <filesystem>

#include <caf/openssl/all.hpp>

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

ClusterSystem::ClusterSystem(const NetOptions& options) : options_(options) {
  options_.tls.validate();
  config_ = std::make_unique<caf::actor_system_config>();
  caf::actor_system_config& cfg = *config_;
  cfg.load<caf::io::middleman>();
  if (options_.tls.enabled()) {
    cfg.load<caf::openssl::manager>();
    cfg.openssl_certificate = options_.tls.certificate;
    cfg.openssl_key = options_.tls.key;
    cfg.openssl_cafile = options_.tls.ca;
  }
  cfg.set("middleman.heartbeat-interval", caf::timespan{options_.heartbeat});
  cfg.set("middleman.connection-timeout", caf::timespan{options_.connection_timeout});
  if (options_.scheduler == "sharing") cfg.set("scheduler.policy", caf::atom("sharing"));
  else
    require(options_.scheduler == "stealing",
            "scheduler \"" + options_.scheduler + "\": expected sharing or stealing");
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
