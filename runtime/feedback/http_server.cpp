// HttpServer: cpp-httplib adapted to FeedbackService.
#include "runtime/feedback/http_server.hpp"

#include <httplib.h>

#include "runtime/error.hpp"

namespace moerl::feedback {
namespace {

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

std::string percent_decode(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '+') {
      out += ' ';
    } else if (s[i] == '%' && i + 2 < s.size() && hex_value(s[i + 1]) >= 0 && hex_value(s[i + 2]) >= 0) {
      out += static_cast<char>(hex_value(s[i + 1]) * 16 + hex_value(s[i + 2]));
      i += 2;
    } else {
      out += s[i];
    }
  }
  return out;
}

HttpRequest to_request(const httplib::Request& req) {
  HttpRequest r;
  r.method = req.method;
  r.path = req.path;
  // The URL's query only: httplib also puts the fields of a form-encoded body into req.params.
  const size_t q = req.target.find('?');
  if (q != std::string::npos) {
    std::string_view query = std::string_view(req.target).substr(q + 1);
    while (!query.empty()) {
      const std::string_view part = query.substr(0, query.find('&'));
      query.remove_prefix(std::min(query.size(), part.size() + 1));
      if (part.empty()) continue;
      const size_t eq = part.find('=');
      r.query.emplace(percent_decode(part.substr(0, eq)), eq == std::string_view::npos ? "" : percent_decode(part.substr(eq + 1)));
    }
  }
  r.authorization = req.get_header_value("Authorization");
  r.body = req.body;
  return r;
}

}  // namespace

HttpServer::HttpServer(FeedbackService& service, int threads)
    : service_(service), server_(std::make_unique<httplib::Server>()) {
  const size_t n = static_cast<size_t>(std::max(threads, 2));
  server_->new_task_queue = [n] { return new httplib::ThreadPool(n); };
  server_->set_keep_alive_max_count(1u << 30);  // load clients keep one connection for their whole run
  server_->set_keep_alive_timeout(30);
  server_->set_read_timeout(10);
  server_->set_write_timeout(10);
  server_->set_tcp_nodelay(true);
  // httplib refuses a larger body itself (413) before reading it; the service checks the same limit.
  server_->set_payload_max_length(service.options().max_body_bytes);
  const auto handler = [this](const httplib::Request& req, httplib::Response& res) {
    const HttpResponse r = service_.handle(to_request(req));
    res.status = r.status;
    res.set_content(r.body, r.content_type.c_str());
  };
  server_->Get(".*", handler);
  server_->Post(".*", handler);
  server_->Put(".*", handler);
  server_->Patch(".*", handler);
  server_->Delete(".*", handler);
  server_->Options(".*", handler);
  // Requests httplib rejects before any handler (malformed request line, body too large): a message too.
  server_->set_error_handler([this](const httplib::Request&, httplib::Response& res) {
    if (!res.body.empty()) return;
    std::string what = res.status == 413 ? "request body too large" : "malformed HTTP request";
    res.set_content("{\"error\": \"" + what + " (HTTP " + std::to_string(res.status) + ")\"}", "application/json");
    if (res.status == 413 || res.status == 400 || res.status == 414) service_.count_status(res.status);
  });
}

HttpServer::~HttpServer() = default;

int HttpServer::bind(const std::string& host, int port) {
  if (port == 0) {
    const int p = server_->bind_to_any_port(host);
    require(p > 0, "feedback server: cannot bind " + host + " to a free port");
    return p;
  }
  require(server_->bind_to_port(host, port), "feedback server: cannot bind " + host + ":" + std::to_string(port));
  return port;
}

void HttpServer::run() { server_->listen_after_bind(); }

void HttpServer::stop() { server_->stop(); }

}  // namespace moerl::feedback
