// The feedback endpoint over HTTP/1.1 (cpp-httplib): every request goes to FeedbackService::handle().
// One worker thread per open connection (httplib's model), so `threads` bounds concurrent keep-alive clients.
#pragma once
#include <memory>
#include <string>

#include "runtime/feedback/service.hpp"

namespace httplib { class Server; }

namespace moerl::feedback {

class HttpServer {
 public:
  HttpServer(FeedbackService& service, int threads = 64);
  ~HttpServer();
  // Binds host:port; port 0 picks a free one. Returns the port. Throws moerl::Error when binding fails.
  int bind(const std::string& host, int port);
  void run();   // serves until stop()
  void stop();  // from any thread

 private:
  FeedbackService& service_;
  std::unique_ptr<httplib::Server> server_;
};

}  // namespace moerl::feedback
