// `moerl run RECIPE --processes N` without --process: this process launches the N `moerl run` processes of a
// multi-process run itself (each with --process I and a fresh --rendezvous folder under the run folder) and
// supervises them. When one of them dies (a crash, SIGKILL, a failed stage), the others are stopped and all N
// are launched again: the run resumes from its newest checkpoint (process 0 writes every party's weights and
// optimizer state there), so a killed process costs the steps since that checkpoint, not the run.
//
// Logs: process 0 writes to this process's stdout and stderr (the summary JSON at the end); process I > 0 to
// <out>/launch/process-I.log. <out>/launch/pids.json names the current attempt and the processes' pids.
#pragma once
#include <filesystem>
#include <string>
#include <vector>

namespace moerl::cli {

struct LaunchSpec {
  std::filesystem::path binary;          // the moerl executable (this one: /proc/self/exe)
  std::vector<std::string> run_args;     // after "run": the recipe, its --set and --out options
  std::filesystem::path out;             // the run folder (the recipe's out, or --out)
  int processes = 2;
  int restarts = 3;                      // launches after the first, when a process dies
};

// Runs the processes to the end; returns 0 when all of them finished, else 1 after `restarts` relaunches
// (printing which process failed and where its log is). SIGINT/SIGTERM stop the processes and return 128+sig.
int launch_processes(const LaunchSpec& spec);

}  // namespace moerl::cli
