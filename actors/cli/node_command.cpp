// moerl node --join HOST:PORT [--secret-file F] [--name N] [--tls-*]
#include <CLI/CLI.hpp>

#include "actors/cli/cluster_wiring.hpp"
#include "actors/cli/commands.hpp"
#include "actors/cluster/process.hpp"

namespace moerl::cli {

void add_node_command(CLI::App& app, std::function<int()>& action) {
  auto* cmd = app.add_subcommand(
      "node", "Join a cluster as a node: connect to the head, prove the cluster secret (HMAC challenge-response, "
              "the secret never travels), and run the roles the head places here until the head ends the cluster "
              "(exit 0). A node that loses the head stops its roles and joins again (exit 1 when it cannot within "
              "--connect-timeout-s). A wrong secret is refused (exit 1).");
  struct Args {
    cluster::NodeOptions node;
    std::string join;
    int64_t heartbeat_ms = 250, timeout_ms = 2000, connect_timeout_s = 30;
    bool no_rejoin = false;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("--join", args->join, "The head's HOST:PORT")->required();
  cmd->add_option("--secret-file", args->node.secret_file,
                  std::string("File holding the cluster secret; default ") + cluster::kDefaultSecretFile);
  cmd->add_option("--name", args->node.name, "This node's name in the cluster (default: <hostname>-<pid>)");
  cmd->add_option("--connect-timeout-s", args->connect_timeout_s, "Keep trying to reach the head this long")
      ->capture_default_str();
  cmd->add_flag("--no-rejoin", args->no_rejoin, "Exit (code 1) when the head is lost instead of joining again");
  add_net_flags(cmd, args->node.net, args->heartbeat_ms, args->timeout_ms);
  cmd->callback([args, &action] {
    action = [args] {
      cluster::NodeOptions node = args->node;
      std::tie(node.host, node.port) = cluster::parse_endpoint(args->join, "--join");
      node.net.heartbeat = std::chrono::milliseconds(args->heartbeat_ms);
      node.net.connection_timeout = std::chrono::milliseconds(args->timeout_ms);
      node.net.register_types = register_cluster_role_types;
      node.catalog = cluster_role_catalog();
      node.connect_timeout = std::chrono::seconds(args->connect_timeout_s);
      node.rejoin = !args->no_rejoin;
      cluster::install_stop_signals();
      return cluster::run_node(node);
    };
  });
}

}  // namespace moerl::cli
