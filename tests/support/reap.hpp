// Waiting for a child process with a deadline, so that a stuck child never outlives its test.
#pragma once
#include <signal.h>
#include <sys/wait.h>

#include <chrono>
#include <optional>
#include <thread>

namespace moerl::test {

// The waitpid status of `child` once it ends before `deadline`; std::nullopt, after killing it (SIGKILL) and
// reaping it, when it is still running then.
inline std::optional<int> reap_by(pid_t child, std::chrono::steady_clock::time_point deadline) {
  int status = 0;
  pid_t done = 0;
  while ((done = waitpid(child, &status, WNOHANG)) == 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  if (done != 0) return status;
  kill(child, SIGKILL);
  waitpid(child, &status, 0);
  return std::nullopt;
}

}  // namespace moerl::test
