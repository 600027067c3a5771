// start_server / stop_server: fork + exec with the child's stdout on a pipe.
#include "runtime/feedback/server_process.hpp"

#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>

#include "runtime/error.hpp"

namespace moerl::feedback {

ServerProcess start_server(const std::string& exe, const std::string& db, const std::string& tokens,
                           const std::vector<std::string>& extra) {
  std::vector<std::string> args = {exe, "feedback", "serve", "--db", db, "--port", "0", "--tokens", tokens};
  args.insert(args.end(), extra.begin(), extra.end());
  int out[2];
  require(::pipe(out) == 0, "feedback server: pipe() failed");
  const pid_t pid = ::fork();
  require(pid >= 0, "feedback server: fork() failed");
  if (pid == 0) {
    ::dup2(out[1], STDOUT_FILENO);
    ::close(out[0]);
    ::close(out[1]);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    ::execv(exe.c_str(), argv.data());
    ::_exit(127);
  }
  ::close(out[1]);
  std::string line;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (line.find('\n') == std::string::npos && std::chrono::steady_clock::now() < deadline) {
    pollfd p{out[0], POLLIN, 0};
    if (::poll(&p, 1, 200) <= 0) continue;
    char buffer[256];
    const ssize_t r = ::read(out[0], buffer, sizeof buffer);
    if (r <= 0) break;
    line.append(buffer, static_cast<size_t>(r));
  }
  ::close(out[0]);  // the child's later output goes to a closed pipe: it writes nothing more
  const size_t colon = line.rfind(':');
  if (line.find("listening on") == std::string::npos || colon == std::string::npos) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
    throw Error("feedback server " + exe + " did not start: \"" + line.substr(0, 200) + "\"");
  }
  return ServerProcess{pid, std::atoi(line.c_str() + colon + 1)};
}

int stop_server(const ServerProcess& server, int signal) {
  int status = 0;
  ::kill(server.pid, signal);
  ::waitpid(server.pid, &status, 0);
  return status;
}

std::vector<std::string> write_test_tokens(const std::string& path, const std::string& admin_token, int annotators) {
  std::ofstream f(path);
  f << "# role name token\nadmin admin " << admin_token << "\n";
  std::vector<std::string> tokens;
  for (int i = 0; i < annotators; ++i) {
    tokens.push_back("annotator-token-" + std::to_string(i) + "-0123456789");
    f << "annotator ann" << i << " " << tokens.back() << "\n";
  }
  require(f.good(), path + ": cannot write the tokens file");
  return tokens;
}

}  // namespace moerl::feedback
