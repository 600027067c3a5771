// Starting `moerl feedback serve` as a child process on a free loopback port (the benchmark, the crash and
// browser tests): the child prints "listening on http://HOST:PORT" once bound, and we read the port from it.
#pragma once
#include <sys/types.h>

#include <string>
#include <vector>

namespace moerl::feedback {

struct ServerProcess {
  pid_t pid = -1;
  int port = 0;
};

// Runs `exe feedback serve --db DB --port 0 --tokens TOKENS extra...` and waits (up to 30 s) for its line.
// Throws moerl::Error when it exits or stays silent.
ServerProcess start_server(const std::string& exe, const std::string& db, const std::string& tokens,
                           const std::vector<std::string>& extra = {});
// Sends `signal` and reaps the child; returns its wait status.
int stop_server(const ServerProcess& server, int signal);

// Writes a tokens file with one admin ("admin", token `admin_token`) and `annotators` annotators named
// ann0.. with tokens "annotator-token-<i>-0123456789". Returns the annotator tokens.
std::vector<std::string> write_test_tokens(const std::string& path, const std::string& admin_token, int annotators);

}  // namespace moerl::feedback
