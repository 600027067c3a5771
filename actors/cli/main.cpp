// moerl: the command line. Subcommands are wired here; each lives in its own file.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>

#include "runtime/error.hpp"

int main(int argc, char** argv) {
  CLI::App app{"moerl: train DeepSeek-V3-style mixture-of-experts models in FP8, from pretraining to RLHF"};
  app.require_subcommand(1);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  return 0;
}
