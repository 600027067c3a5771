// moerl: the command line. Each subcommand lives in its own file and is wired here.
//   exit 0: success; 1: a runtime failure (one line on stderr); 2: bad usage (the usage is printed).
#include <csignal>
#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>

#include "actors/cli/commands.hpp"
#include "actors/cli/feedback.hpp"
#include "runtime/version.hpp"

int main(int argc, char** argv) {
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
    const int code = app.exit(e);  // prints help/version (code 0) or the error and usage
    if (code != 0 && !dynamic_cast<const CLI::CallForHelp*>(&e)) std::fprintf(stderr, "%s", app.help().c_str());
    return code == 0 ? 0 : 2;
  }
  try {
    return action ? action() : 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moerl: error: %s\n", e.what());
    return 1;
  }
}
