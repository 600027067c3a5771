// The feedback endpoint over HTTP/1.1: every request goes to FeedbackService::handle_async().
//
// One event-loop thread (epoll, nonblocking sockets, keep-alive, pipelined requests answered in order)
// reads requests and writes answers; a submission is handed to the store and its connection waits, without
// holding a thread, until the group commit that makes it durable answers it (the committer posts the answer
// back to the loop through an eventfd). So every open connection's submission joins the next WAL sync:
// many keep-alive clients share each fsync, which is where the throughput comes from (bench feedback).
// Request bodies need a Content-Length (no chunked uploads: 411); heads are at most 16 KiB (431).
#pragma once
#include <memory>
#include <string>

#include "runtime/feedback/service.hpp"

namespace moerl::feedback {

class HttpServer {
 public:
  // `threads` is kept for the callers written for the thread-per-connection server; it no longer bounds
  // the open connections (the loop takes up to 65536).
  HttpServer(FeedbackService& service, int threads = 64);
  ~HttpServer();
  // Binds host:port; port 0 picks a free one. Returns the port. Throws moerl::Error when binding fails.
  int bind(const std::string& host, int port);
  // Serves until stop(); then waits (up to 10 s) for the submissions still in the store's queue, so their
  // callbacks have run before the caller destroys the service.
  void run();
  void stop();  // from any thread, also before run()

  struct Loop;

 private:
  std::shared_ptr<Loop> loop_;  // shared with the store's callbacks still in flight
};

}  // namespace moerl::feedback
