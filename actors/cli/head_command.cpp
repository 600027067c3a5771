// moerl head [--port P] [--host H] [--secret-file F] [--tls-*] [--run RECIPE [--set k=v] [--nodes N] [--placement role=node]]
#include <CLI/CLI.hpp>

#include "actors/cli/cluster_wiring.hpp"
#include "actors/cli/commands.hpp"
#include "actors/cluster/process.hpp"
#include "runtime/recipe/placement.hpp"

namespace moerl::cli {

void add_head_command(CLI::App& app, std::function<int()>& action) {
  auto* cmd = app.add_subcommand(
      "head", "Start the head of a cluster: nodes join it (`moerl node --join HOST:PORT`) after proving that they "
              "hold the cluster secret; the head places roles on them and restarts the roles of a node that dies.\n"
              "With --run it runs a recipe across the cluster once --nodes nodes have joined, prints the summary "
              "and ends the cluster; without it serves until SIGINT/SIGTERM.");
  struct Args {
    cluster::HeadOptions head;
    std::string recipe, out;
    std::vector<std::string> overrides, placement;
    int64_t heartbeat_ms = 250, timeout_ms = 2000, wait_s = 120;
    bool no_local_roles = false;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("--port", args->head.port, "TCP port to listen on (0: any free port; see --port-file)")
      ->check(CLI::Range(0, 65535))
      ->capture_default_str();
  cmd->add_option("--host", args->head.host, "Interface to listen on; 0.0.0.0 for every interface")
      ->capture_default_str();
  cmd->add_option("--secret-file", args->head.secret_file,
                  std::string("File holding the cluster secret (at least 16 bytes, mode 600); default ") +
                      cluster::kDefaultSecretFile + ", written with a new random secret when missing");
  cmd->add_option("--port-file", args->head.port_file, "Write the port here once listening");
  cmd->add_option("--name", args->head.name, "The head's own node name (for placement)")->capture_default_str();
  cmd->add_flag("--no-local-roles", args->no_local_roles, "Run no roles in the head process");
  add_net_flags(cmd, args->head.net, args->heartbeat_ms, args->timeout_ms);
  cmd->add_option("--run", args->recipe, "Run this recipe across the cluster, then end it");
  cmd->add_option("--set", args->overrides, "With --run: override a recipe field, dotted.path=value (repeatable)");
  cmd->add_option("--out", args->out, "With --run: the run folder (shared by every node)");
  cmd->add_option("--nodes", args->head.wait_nodes, "With --run: wait until this many nodes have joined");
  cmd->add_option("--wait-s", args->wait_s, "With --run: how long to wait for them")->capture_default_str();
  cmd->add_option("--placement", args->placement,
                  "With --run: role=node (repeatable; roles: loader, trainer; node: a --name, head, or any); "
                  "overrides the recipe's placement section");
  cmd->callback([args, &action] {
    action = [args] {
      cluster::HeadOptions head = args->head;
      head.local_roles = !args->no_local_roles;
      head.net.heartbeat = std::chrono::milliseconds(args->heartbeat_ms);
      head.net.connection_timeout = std::chrono::milliseconds(args->timeout_ms);
      head.net.register_types = register_cluster_role_types;
      head.catalog = cluster_role_catalog();
      head.wait_timeout = std::chrono::seconds(args->wait_s);
      if (!args->recipe.empty()) {
        cluster::ClusterRunOptions run;
        run.recipe = args->recipe;
        run.overrides = args->overrides;
        run.out = args->out;
        run.placement = merge_placement(load_placement(args->recipe), parse_placement(args->placement));
        head.run = run;
      }
      cluster::install_stop_signals();
      return cluster::run_head(head);
    };
  });
}

}  // namespace moerl::cli
