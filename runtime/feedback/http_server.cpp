// HttpServer: an epoll loop around FeedbackService::handle_async().
#include "runtime/feedback/http_server.hpp"

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>
#include <unordered_map>
#include <vector>

#include "runtime/error.hpp"

namespace moerl::feedback {
namespace {

using Clock = std::chrono::steady_clock;
constexpr size_t kMaxHead = 16 * 1024;               // request line + headers
constexpr auto kIdle = std::chrono::seconds(30);     // a keep-alive connection between requests
constexpr auto kSlow = std::chrono::seconds(10);     // a request (or an answer) that moves no byte this long
constexpr uint64_t kListenId = 0, kWakeId = 1;       // epoll ids; connections count from 2

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

std::string percent_decode(std::string_view s, bool plus_is_space) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '+' && plus_is_space) {
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

const char* reason(int status) {
  switch (status) {
    case 200: return "OK";
    case 201: return "Created";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 411: return "Length Required";
    case 413: return "Payload Too Large";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 505: return "HTTP Version Not Supported";
    default: return "Status";
  }
}

std::string serialize(const HttpResponse& r, bool keep_alive) {
  std::string out;
  out.reserve(r.body.size() + 120);
  out += "HTTP/1.1 ";
  out += std::to_string(r.status);
  out += ' ';
  out += reason(r.status);
  out += "\r\nContent-Type: ";
  out += r.content_type;
  out += "\r\nContent-Length: ";
  out += std::to_string(r.body.size());
  out += keep_alive ? "\r\n\r\n" : "\r\nConnection: close\r\n\r\n";
  out += r.body;
  return out;
}

bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && strncasecmp(a.data(), b.data(), a.size()) == 0;
}
bool icontains(std::string_view haystack, std::string_view needle) {
  for (size_t i = 0; i + needle.size() <= haystack.size(); ++i)
    if (strncasecmp(haystack.data() + i, needle.data(), needle.size()) == 0) return true;
  return false;
}
std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

struct Conn {
  int fd = -1;
  std::string in, out;
  size_t out_done = 0;
  bool waiting = false;        // a request is with the service; its answer comes through post()
  bool closing = false;        // close once `out` is written
  bool draining = false;       // a refused body: after the answer, drop input until the peer closes
  bool sent_continue = false;  // "100 Continue" sent for the request being read
  uint32_t interest = EPOLLIN;
  Clock::time_point active;    // last byte moved
};

struct Posted {
  uint64_t id;
  std::string bytes;
  bool close;
};

}  // namespace

struct HttpServer::Loop : std::enable_shared_from_this<HttpServer::Loop> {
  explicit Loop(FeedbackService& s) : service(s) {
    ep = ::epoll_create1(EPOLL_CLOEXEC);
    wake_fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    require(ep >= 0 && wake_fd >= 0, "feedback server: epoll/eventfd creation failed");
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = kWakeId;
    ::epoll_ctl(ep, EPOLL_CTL_ADD, wake_fd, &ev);
  }
  ~Loop() { close_all(); }

  FeedbackService& service;
  int listen_fd = -1, ep = -1, wake_fd = -1;
  std::atomic<bool> stopping{false};
  std::thread::id loop_thread;
  std::unordered_map<uint64_t, Conn> conns;  // references stay valid across inserts (node-based)
  uint64_t next_id = 2;
  size_t waiting = 0;                        // connections with a request at the service

  std::mutex mutex;                          // guards posted, closed
  std::vector<Posted> posted;
  bool closed = false;

  void wake() {
    const uint64_t one = 1;
    [[maybe_unused]] const ssize_t w = ::write(wake_fd, &one, sizeof one);
  }

  // An answer for connection `id`: from the loop itself (answered at once) or from the store's committer.
  void post(uint64_t id, std::string bytes, bool close) {
    if (std::this_thread::get_id() == loop_thread) {
      deliver(id, std::move(bytes), close);
      return;
    }
    bool first;
    {
      std::lock_guard lock(mutex);
      if (closed) return;
      first = posted.empty();
      posted.push_back(Posted{id, std::move(bytes), close});
    }
    if (first) wake();  // one wake-up per batch of answers
  }

  // Appends the answer; the caller flushes (process() or on_wake()).
  Conn* deliver(uint64_t id, std::string bytes, bool close) {
    const auto it = conns.find(id);
    if (it == conns.end()) return nullptr;  // the client left meanwhile
    Conn& c = it->second;
    if (c.out_done == c.out.size()) {
      c.out = std::move(bytes);
      c.out_done = 0;
    } else {
      c.out += bytes;
    }
    if (c.waiting) --waiting;
    c.waiting = false;
    c.closing = c.closing || close;
    return &c;
  }

  void on_wake() {
    uint64_t n;
    [[maybe_unused]] const ssize_t r = ::read(wake_fd, &n, sizeof n);  // before the swap: no post is missed
    std::vector<Posted> batch;
    {
      std::lock_guard lock(mutex);
      batch.swap(posted);
    }
    for (auto& p : batch)
      if (deliver(p.id, std::move(p.bytes), p.close)) process(p.id);
  }

  void set_interest(uint64_t id, Conn& c) {
    uint32_t want = 0;
    if (!c.waiting && (!c.closing || c.draining)) want |= EPOLLIN;
    if (c.out_done < c.out.size()) want |= EPOLLOUT;
    if (want == c.interest) return;
    epoll_event ev{};
    ev.events = want;
    ev.data.u64 = id;
    ::epoll_ctl(ep, EPOLL_CTL_MOD, c.fd, &ev);
    c.interest = want;
  }

  void close_conn(uint64_t id) {
    const auto it = conns.find(id);
    if (it == conns.end()) return;
    if (it->second.waiting) --waiting;
    ::epoll_ctl(ep, EPOLL_CTL_DEL, it->second.fd, nullptr);
    ::close(it->second.fd);
    conns.erase(it);
  }

  // Writes what it can; closes when done and closing. Returns false when the connection is gone.
  bool flush(uint64_t id, Conn& c) {
    while (c.out_done < c.out.size()) {
      const ssize_t w = ::send(c.fd, c.out.data() + c.out_done, c.out.size() - c.out_done, MSG_NOSIGNAL);
      if (w > 0) {
        c.out_done += static_cast<size_t>(w);
        c.active = Clock::now();
      } else if (w < 0 && errno == EINTR) {
        continue;
      } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        break;
      } else {
        close_conn(id);
        return false;
      }
    }
    if (c.out_done == c.out.size()) {
      c.out.clear();
      c.out_done = 0;
      if (c.closing && !c.draining) {
        close_conn(id);
        return false;
      }
      if (c.draining) ::shutdown(c.fd, SHUT_WR);  // the answer is out; read until the client closes
    }
    set_interest(id, c);
    return true;
  }

  // Answers the request at hand with an error and ends the connection (after draining when `drain`).
  void refuse(Conn& c, int status, const std::string& message, bool drain) {
    const HttpResponse r{status, "application/json", nlohmann::json{{"error", message}}.dump()};
    c.out += serialize(r, false);
    c.closing = true;
    c.draining = drain;
    c.in.clear();
    service.count_status(status);
  }

  // Parses and dispatches the complete requests in c.in, one at a time (answers go out in request order).
  void process(uint64_t id) {
    const auto it = conns.find(id);
    if (it == conns.end()) return;
    Conn& c = it->second;
    while (!c.waiting && !c.closing) {
      size_t start = 0;
      while (c.in.compare(start, 2, "\r\n") == 0) start += 2;  // stray line ends between requests
      if (start) c.in.erase(0, start);
      const size_t head_end = c.in.find("\r\n\r\n");
      if (head_end == std::string::npos || head_end > kMaxHead) {
        if (c.in.size() > kMaxHead) refuse(c, 431, "request line and headers exceed 16 KiB", false);
        break;
      }
      const std::string_view head(c.in.data(), head_end);
      const size_t line_end = std::min(head.find("\r\n"), head.size());
      const std::string_view line = head.substr(0, line_end);
      const size_t sp1 = line.find(' '), sp2 = line.rfind(' ');
      if (sp1 == std::string_view::npos || sp2 == sp1 || sp1 == 0 || sp1 > 16) {
        refuse(c, 400, "malformed HTTP request line", false);
        break;
      }
      const std::string_view method = line.substr(0, sp1), target = line.substr(sp1 + 1, sp2 - sp1 - 1),
                             version = line.substr(sp2 + 1);
      if (version != "HTTP/1.1" && version != "HTTP/1.0") {
        refuse(c, version.rfind("HTTP/", 0) == 0 ? 505 : 400, "expected HTTP/1.1 or HTTP/1.0", false);
        break;
      }
      if (target.empty() || target.front() != '/') {
        refuse(c, 400, "the request target must be a path starting with /", false);
        break;
      }
      HttpRequest request;
      request.method = std::string(method);
      bool keep_alive = version == "HTTP/1.1", expect_continue = false, bad = false, chunked = false;
      size_t length = 0;
      bool have_length = false;
      for (size_t p = line_end; p < head.size() && !bad;) {
        const size_t next = std::min(head.find("\r\n", p + 2), head.size());
        const std::string_view header = head.substr(p + 2, next - p - 2);
        p = next;
        const size_t colon = header.find(':');
        if (colon == std::string_view::npos || colon == 0) {
          bad = true;
          break;
        }
        const std::string_view name = header.substr(0, colon), value = trim(header.substr(colon + 1));
        if (iequals(name, "Content-Length")) {
          size_t n = 0;
          bool digits = !value.empty() && value.size() <= 12;
          for (char ch : value) digits = digits && ch >= '0' && ch <= '9', n = n * 10 + static_cast<size_t>(ch - '0');
          if (!digits || (have_length && n != length)) bad = true;
          length = n;
          have_length = true;
        } else if (iequals(name, "Transfer-Encoding")) {
          chunked = true;
        } else if (iequals(name, "Authorization")) {
          request.authorization = std::string(value);
        } else if (iequals(name, "Connection")) {
          if (icontains(value, "close")) keep_alive = false;
          else if (icontains(value, "keep-alive")) keep_alive = true;
        } else if (iequals(name, "Expect")) {
          expect_continue = iequals(value, "100-continue");
        }
      }
      if (bad) {
        refuse(c, 400, "malformed HTTP header (or conflicting Content-Length)", false);
        break;
      }
      if (chunked) {
        refuse(c, 411, "chunked request bodies are not supported: send a Content-Length", true);
        break;
      }
      const size_t max_body = service.options().max_body_bytes;
      if (length > max_body) {
        refuse(c, 413, "request body of " + std::to_string(length) + " bytes, at most " + std::to_string(max_body) +
                           " allowed", true);
        break;
      }
      const size_t total = head_end + 4 + length;
      if (c.in.size() < total) {
        if (expect_continue && !c.sent_continue) {
          c.out += "HTTP/1.1 100 Continue\r\n\r\n";
          c.sent_continue = true;
        }
        break;
      }
      const size_t q = target.find('?');
      request.path = percent_decode(target.substr(0, q), false);
      if (q != std::string_view::npos) {
        std::string_view query = target.substr(q + 1);
        while (!query.empty()) {
          const std::string_view part = query.substr(0, query.find('&'));
          query.remove_prefix(std::min(query.size(), part.size() + 1));
          if (part.empty()) continue;
          const size_t eq = part.find('=');
          request.query.emplace(percent_decode(part.substr(0, eq), true),
                                eq == std::string_view::npos ? "" : percent_decode(part.substr(eq + 1), true));
        }
      }
      request.body.assign(c.in, head_end + 4, length);
      c.in.erase(0, total);
      c.sent_continue = false;
      c.waiting = true;
      ++waiting;
      service.handle_async(request, [self = shared_from_this(), id, keep_alive](HttpResponse r) {
        self->post(id, serialize(r, keep_alive), !keep_alive);
      });
    }
    flush(id, c);
  }

  void on_readable(uint64_t id) {
    const auto it = conns.find(id);
    if (it == conns.end()) return;
    Conn& c = it->second;
    char buffer[65536];
    for (;;) {
      const ssize_t r = ::recv(c.fd, buffer, sizeof buffer, 0);
      if (r > 0) {
        if (!c.draining) c.in.append(buffer, static_cast<size_t>(r));
        c.active = Clock::now();
        if (static_cast<size_t>(r) < sizeof buffer) break;
      } else if (r < 0 && errno == EINTR) {
        continue;
      } else if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        break;
      } else {  // the peer closed (or reset): any answer still owed to it is dropped
        close_conn(id);
        return;
      }
    }
    process(id);
  }

  void on_accept() {
    for (;;) {
      const int fd = ::accept4(listen_fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) return;  // EAGAIN, or out of descriptors: the rest wait in the backlog
      const int one = 1;
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      const uint64_t id = next_id++;
      Conn& c = conns[id];
      c.fd = fd;
      c.active = Clock::now();
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.u64 = id;
      ::epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    }
  }

  // Closes connections idle past kIdle, or stuck mid-request or mid-answer past kSlow.
  void sweep() {
    const auto now = Clock::now();
    std::vector<uint64_t> stale;
    for (const auto& [id, c] : conns) {
      if (c.waiting) continue;
      const bool between = c.in.empty() && c.out.empty() && !c.draining;
      if (now - c.active > (between ? std::chrono::duration_cast<Clock::duration>(kIdle) : kSlow)) stale.push_back(id);
    }
    for (uint64_t id : stale) close_conn(id);
  }

  void run() {
    loop_thread = std::this_thread::get_id();
    std::vector<epoll_event> events(512);
    auto last_sweep = Clock::now();
    auto deadline = Clock::time_point::max();
    for (;;) {
      if (stopping && deadline == Clock::time_point::max()) {
        // Stop taking requests; answer those the store still holds (their callbacks use the service).
        deadline = Clock::now() + std::chrono::seconds(10);
        if (listen_fd >= 0) {
          ::epoll_ctl(ep, EPOLL_CTL_DEL, listen_fd, nullptr);
          ::close(listen_fd);
          listen_fd = -1;
        }
      }
      if (stopping && (waiting == 0 || Clock::now() > deadline)) break;
      const int n = ::epoll_wait(ep, events.data(), static_cast<int>(events.size()), stopping ? 50 : 1000);
      for (int i = 0; i < n; ++i) {
        const uint64_t id = events[i].data.u64;
        if (id == kListenId) {
          on_accept();
        } else if (id == kWakeId) {
          on_wake();
        } else {
          if (events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(id);
          const auto it = conns.find(id);
          if (it != conns.end() && (events[i].events & EPOLLOUT)) flush(id, it->second);
        }
      }
      if (Clock::now() - last_sweep > std::chrono::seconds(1)) {
        sweep();
        last_sweep = Clock::now();
      }
    }
    close_all();
  }

  void close_all() {
    {
      std::lock_guard lock(mutex);
      if (closed) return;
      closed = true;
    }
    for (auto& [id, c] : conns) ::close(c.fd);
    conns.clear();
    if (listen_fd >= 0) ::close(listen_fd);
    if (ep >= 0) ::close(ep);
    if (wake_fd >= 0) ::close(wake_fd);
    listen_fd = ep = wake_fd = -1;
  }
};

HttpServer::HttpServer(FeedbackService& service, int /*threads*/) : loop_(std::make_shared<Loop>(service)) {}

HttpServer::~HttpServer() {
  loop_->stopping = true;
  loop_->close_all();
}

int HttpServer::bind(const std::string& host, int port) {
  const std::string where = "feedback server: cannot bind " + host + ":" + std::to_string(port);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  require(::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found) == 0 && found, where + " (unknown host)");
  int fd = -1;
  for (addrinfo* a = found; a && fd < 0; a = a->ai_next) {
    fd = ::socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    const int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(fd, a->ai_addr, a->ai_addrlen) != 0 || ::listen(fd, 4096) != 0) {
      ::close(fd);
      fd = -1;
    }
  }
  ::freeaddrinfo(found);
  require(fd >= 0, where + ": " + std::strerror(errno));
  sockaddr_storage addr{};
  socklen_t len = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  const int bound = ntohs(addr.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port
                                                     : reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
  loop_->listen_fd = fd;
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = kListenId;
  ::epoll_ctl(loop_->ep, EPOLL_CTL_ADD, fd, &ev);
  return bound;
}

void HttpServer::run() { loop_->run(); }

void HttpServer::stop() {
  loop_->stopping = true;
  std::lock_guard lock(loop_->mutex);
  if (!loop_->closed) loop_->wake();
}

}  // namespace moerl::feedback
