// moerl: the command line. Each subcommand lives in its own file and is wired here.
//   exit 0: success; 1: a runtime failure (one line on stderr); 2: bad usage (the usage, then the error as the
//   last line).
#include <csignal>
#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>
#include <string>

#include "actors/cli/commands.hpp"
#include "actors/cli/feedback.hpp"
#include "runtime/util/crash_report.hpp"
#include "runtime/version.hpp"

int main(int argc, char** argv) {
  // A crash or abort (a corrupt heap's included) names its signal and prints the stack before the process ends.
  moerl::install_crash_report("moerl");
  // A write to a connection whose peer died (Gloo's TCP pairs between the processes of a run, a client of the
  // feedback server gone) then fails with EPIPE, which the caller reports naming the connection, instead of
  // SIGPIPE ending this process without a word (seen: the surviving process of a two-process run killed so).
  std::signal(SIGPIPE, SIG_IGN);
  CLI::App app{"moerl: train DeepSeek-V3-style mixture-of-experts models in FP8, from pretraining through SFT "
               "to RLHF.\nRun `moerl <command> --help` for the options of a command."};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("moerl ") + moerl::git_revision());
  std::function<int()> action;
  moerl::cli::add_run_command(app, action);
  moerl::cli::add_eval_command(app, action);
  moerl::cli::add_bench_command(app, action);
  moerl::cli::add_head_command(app, action);
  moerl::cli::add_node_command(app, action);
  moerl::cli::add_feedback_command(app, action);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help, --version
    // The usage of the command at fault, then what was wrong as the last line, where a terminal leaves it in view.
    std::string what = e.what();
    if (app.get_subcommands().empty() && argc > 1 && argv[1][0] != '-') {  // CLI11 says "A subcommand is required"
      std::string commands;
      for (const CLI::App* sub : app.get_subcommands({})) commands += (commands.empty() ? "" : ", ") + sub->get_name();
      what = std::string("'") + argv[1] + "' is not a command (" + commands + ")";
    }
    std::fprintf(stderr, "%s\nmoerl: error: %s\n", app.help().c_str(), what.c_str());
    return 2;
  }
  try {
    return action ? action() : 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moerl: error: %s\n", e.what());
    return 1;
  }
}
