// run_load: nonblocking sockets on one epoll loop.
#include "runtime/feedback/load_client.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <chrono>
#include <cstring>

#include "runtime/error.hpp"

namespace moerl::feedback {
namespace {

using Clock = std::chrono::steady_clock;

struct Connection {
  int fd = -1;
  std::string token, out, in;
  size_t written = 0;
  bool in_flight = false;
  Clock::time_point started;
};

int connect_to(const std::string& host, int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  require(fd >= 0, "load client: socket() failed");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  require(::inet_pton(AF_INET, host.c_str(), &addr.sin_addr) == 1, "load client: bad IPv4 address " + host);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return -1;
  }
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return fd;
}

// Length of the complete response at the start of `in`, 0 when incomplete; sets status and body.
size_t complete_response(const std::string& in, int& status, std::string_view& body) {
  const size_t head_end = in.find("\r\n\r\n");
  if (head_end == std::string::npos) return 0;
  status = in.size() > 12 ? std::atoi(in.c_str() + 9) : 0;
  size_t length = 0;
  for (size_t p = in.find("\r\n"); p < head_end; p = in.find("\r\n", p + 2)) {
    if (strncasecmp(in.c_str() + p + 2, "Content-Length:", 15) == 0) length = std::strtoul(in.c_str() + p + 17, nullptr, 10);
  }
  if (in.size() < head_end + 4 + length) return 0;
  body = std::string_view(in).substr(head_end + 4, length);
  return head_end + 4 + length;
}

}  // namespace

double percentile(std::vector<double> values, double q) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const size_t rank = static_cast<size_t>(std::ceil(q * static_cast<double>(values.size())));
  return values[std::clamp<size_t>(rank, 1, values.size()) - 1];
}

LoadResult run_load(const LoadOptions& o) {
  require(!o.tokens.empty() && o.body, "load client: tokens and a body generator are required");
  std::vector<Connection> conns;
  for (int i = 0; i < o.connections; ++i) {
    const int fd = connect_to(o.host, o.port);
    if (fd < 0) continue;
    Connection c;
    c.fd = fd;
    c.token = o.tokens[static_cast<size_t>(i) % o.tokens.size()];
    conns.push_back(std::move(c));
  }
  require(!conns.empty(), "load client: cannot connect to " + o.host + ":" + std::to_string(o.port));
  const int ep = ::epoll_create1(0);
  for (size_t i = 0; i < conns.size(); ++i) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = i;
    ::epoll_ctl(ep, EPOLL_CTL_ADD, conns[i].fd, &ev);
  }
  LoadResult result;
  uint64_t n = 0;
  const auto start = Clock::now();
  const auto deadline = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(o.seconds));
  auto last_answer = start;
  const auto send_next = [&](Connection& c) {
    const std::string body = o.body(n++);
    c.out = o.method + " " + o.path + " HTTP/1.1\r\nHost: " + o.host + "\r\nAuthorization: Bearer " + c.token +
            "\r\nContent-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
    c.written = 0;
    c.in_flight = true;
    c.started = Clock::now();
    ++result.sent;
    while (c.written < c.out.size()) {  // requests are small: the socket buffer takes them whole
      const ssize_t w = ::send(c.fd, c.out.data() + c.written, c.out.size() - c.written, MSG_NOSIGNAL);
      if (w <= 0) return false;
      c.written += static_cast<size_t>(w);
    }
    return true;
  };
  const auto drop = [&](Connection& c) {
    if (c.in_flight) ++result.lost_connections;
    c.in_flight = false;
    ::epoll_ctl(ep, EPOLL_CTL_DEL, c.fd, nullptr);
    ::close(c.fd);
    c.fd = -1;
  };
  for (auto& c : conns)
    if (!send_next(c)) drop(c);
  std::vector<epoll_event> events(conns.size());
  char buffer[65536];
  for (;;) {
    const bool any = std::any_of(conns.begin(), conns.end(), [](const Connection& c) { return c.fd >= 0 && c.in_flight; });
    if (!any) break;
    const int ready = ::epoll_wait(ep, events.data(), static_cast<int>(events.size()), 1000);
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0) {
      if (Clock::now() > deadline + std::chrono::seconds(10)) break;  // a server that stopped answering
      continue;
    }
    for (int e = 0; e < ready; ++e) {
      Connection& c = conns[events[e].data.u64];
      if (c.fd < 0) continue;
      const ssize_t r = ::recv(c.fd, buffer, sizeof buffer, 0);
      if (r <= 0) {
        drop(c);
        continue;
      }
      c.in.append(buffer, static_cast<size_t>(r));
      int status = 0;
      std::string_view body;
      const size_t used = complete_response(c.in, status, body);
      if (used == 0) continue;
      const auto now = Clock::now();
      last_answer = now;
      result.latency_ms.push_back(std::chrono::duration<double, std::milli>(now - c.started).count());
      if (status == 201) {
        ++result.acknowledged;
        if (o.keep_keys) {
          const size_t k = body.find("\"key\":\"");
          if (k != std::string_view::npos) result.keys.emplace_back(body.substr(k + 7, body.find('"', k + 7) - k - 7));
        }
      } else {
        ++result.other_status;
      }
      c.in.erase(0, used);
      c.in_flight = false;
      if (now < deadline && !send_next(c)) drop(c);
    }
  }
  for (auto& c : conns)
    if (c.fd >= 0) ::close(c.fd);
  ::close(ep);
  result.seconds = std::chrono::duration<double>(last_answer - start).count();
  return result;
}

}  // namespace moerl::feedback
