#include "runtime/util/spawn.hpp"

#include <fcntl.h>
#include <spawn.h>

#include <cstring>

#include "runtime/error.hpp"

extern char** environ;

namespace moerl {

pid_t spawn_program(const std::vector<std::string>& argv, const std::filesystem::path& log) {
  require(!argv.empty(), "spawn_program: no program given");
  std::vector<std::string> args = argv;  // posix_spawn takes char* const[]
  std::vector<char*> pointers;
  for (std::string& a : args) pointers.push_back(a.data());
  pointers.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  const std::string log_file = log.string();
  if (!log.empty()) {
    posix_spawn_file_actions_addopen(&actions, 1, log_file.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    posix_spawn_file_actions_adddup2(&actions, 1, 2);
  }
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, args[0].c_str(), &actions, nullptr, pointers.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  require(rc == 0, "cannot start " + args[0] + ": " + std::strerror(rc));
  return pid;
}

}  // namespace moerl
