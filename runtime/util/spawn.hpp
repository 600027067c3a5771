// Starting a program as a child process (posix_spawn), its output optionally appended to a log file.
#pragma once
#include <sys/types.h>

#include <filesystem>
#include <string>
#include <vector>

namespace moerl {

// Starts argv[0] with arguments argv (argv[0] a path) and this process's environment; with `log`, the child's
// stdout and stderr are appended to that file (created if missing), else it inherits them. Returns its pid;
// throws moerl::Error naming the program when it cannot be started.
pid_t spawn_program(const std::vector<std::string>& argv, const std::filesystem::path& log = {});

}  // namespace moerl
