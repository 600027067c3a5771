// The subcommands of `moerl`. Each add_* registers its options on `app` and, when chosen, stores the work
// to run in `action` (run after parsing, so a usage error never starts work).
#pragma once
#include <functional>

namespace CLI { class App; }

namespace moerl::cli {

void add_run_command(CLI::App& app, std::function<int()>& action);
void add_eval_command(CLI::App& app, std::function<int()>& action);
void add_bench_command(CLI::App& app, std::function<int()>& action);
void add_head_command(CLI::App& app, std::function<int()>& action);
void add_node_command(CLI::App& app, std::function<int()>& action);

}  // namespace moerl::cli
