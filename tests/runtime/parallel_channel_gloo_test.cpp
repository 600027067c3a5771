// The Gloo data-plane channel (runtime/parallel/channel_gloo.hpp): the local channel's behaviours over TCP
// between threads, and a channel pair between two processes on loopback.
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <future>
#include <numeric>
#include <thread>
#include <vector>

#include "runtime/error.hpp"
#include "runtime/parallel/channel_gloo.hpp"
#include "tests/support/scratch_dir.hpp"
#include "tests/support/reap.hpp"

namespace moerl {
namespace {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

GlooOptions options(const std::string& prefix, milliseconds timeout) {
  GlooOptions o;
  o.prefix = prefix;
  o.timeout = timeout;
  return o;
}

struct Ends {
  std::shared_ptr<Channel> sender, receiver;
};

// Both ends of channel `name` in this process: the sender connects on a helper thread (a rendezvous waits for
// both ends), the receiver here.
Ends connect_ends(const std::string& name, milliseconds timeout) {
  GlooRendezvous rendezvous = GlooRendezvous::in_memory();
  auto sender = std::async(std::launch::async, [&] {
    return connect_gloo_channel(rendezvous, name, ChannelEnd::kSender, options("t", timeout));
  });
  Ends e;
  e.receiver = connect_gloo_channel(rendezvous, name, ChannelEnd::kReceiver, options("t", timeout));
  e.sender = sender.get();
  return e;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// The local channel's test (parallel_pp_ep_test.cpp, Channel.NamesItself...) over Gloo. The timeout is 300 ms,
// not 20: the first message crosses TCP and two threads, which a busy 2-core machine may delay.
TEST(GlooChannel, NamesItselfOnAWrongSizeATimeoutAndAClose) {
  Ends c = connect_ends("a -> b", milliseconds(300));
  const std::vector<float> sent{1, 2, 3};
  c.sender->send(std::span<const float>(sent));
  std::vector<float> got(2);
  const std::string wrong = error_of([&] { c.receiver->recv(std::span<float>(got)); });
  EXPECT_NE(wrong.find("a -> b"), std::string::npos) << wrong;
  EXPECT_NE(wrong.find("12 bytes"), std::string::npos) << wrong;
  const auto start = Clock::now();
  const std::string late = error_of([&] { c.receiver->recv(std::span<float>(got)); });  // nothing left
  EXPECT_NE(late.find("no message within 300 ms"), std::string::npos) << late;
  EXPECT_GE(Clock::now() - start, milliseconds(300));
  c.sender->close("peer failed");  // travels to the receiving end as a close notice
  const std::string closed = error_of([&] { c.receiver->recv(std::span<float>(got)); });
  EXPECT_NE(closed.find("peer failed"), std::string::npos) << closed;
  EXPECT_NE(error_of([&] { c.sender->send(std::span<const float>(sent)); }).find("send after close"),
            std::string::npos);
  EXPECT_NE(error_of([&] { c.sender->recv(std::span<float>(got)); }).find("sending end"), std::string::npos);
}

// Messages of many sizes (empty, odd, 4 MB) all sent before the first recv — sends do not wait for the
// receiver, or this single thread would block — then read back in order, byte for byte.
TEST(GlooChannel, SendsReturnAtOnceAndMessagesArriveInOrder) {
  Ends c = connect_ends("stage 0 -> 1 activations", milliseconds(10000));
  std::vector<std::vector<float>> messages;
  for (size_t n : {size_t{0}, size_t{1}, size_t{7}, size_t{1} << 20, size_t{3}, size_t{0}, size_t{1000}}) {
    std::vector<float> m(n);
    std::iota(m.begin(), m.end(), static_cast<float>(messages.size()) * 0.5f);
    messages.push_back(std::move(m));
  }
  for (const auto& m : messages) c.sender->send(std::span<const float>(m));
  for (const auto& m : messages) {
    std::vector<float> got(m.size(), -1.0f);
    c.receiver->recv(std::span<float>(got));
    EXPECT_EQ(got, m);
  }
  const std::vector<int64_t> ids{5, -1, 1LL << 40};
  c.sender->send(std::span<const int64_t>(ids));
  std::vector<int64_t> got_ids(3);
  c.receiver->recv(std::span<int64_t>(got_ids));
  EXPECT_EQ(got_ids, ids);
}

TEST(GlooChannel, ClosingTheReceivingEndWakesAWaitingRecv) {
  Ends c = connect_ends("replies", milliseconds(20000));
  auto waiting = std::async(std::launch::async, [&] {
    float x = 0;
    return error_of([&] { c.receiver->recv(&x, sizeof x); });
  });
  std::this_thread::sleep_for(milliseconds(50));
  const auto start = Clock::now();
  c.receiver->close("stage 1 failed");
  ASSERT_EQ(waiting.wait_for(std::chrono::seconds(5)), std::future_status::ready) << "recv still waiting";
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(5));  // not the 20 s timeout
  EXPECT_NE(waiting.get().find("stage 1 failed"), std::string::npos);
}

TEST(GlooChannel, AMissingPeerFailsTheRendezvousNamingTheChannel) {
  GlooRendezvous rendezvous = GlooRendezvous::in_memory();
  const auto start = Clock::now();
  const std::string e = error_of(
      [&] { connect_gloo_channel(rendezvous, "lonely", ChannelEnd::kReceiver, options("m", milliseconds(300))); });
  EXPECT_NE(e.find("channel lonely (receiving end)"), std::string::npos) << e;
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(10));
}

std::vector<float> payload(size_t i) {
  std::vector<float> v(1000 * (i + 1));  // up to 20 kB: several TCP segments
  for (size_t k = 0; k < v.size(); ++k) v[k] = static_cast<float>(k) * 0.125f + static_cast<float>(i);
  return v;
}

// A child process echoes 5 messages back (each plus one) over a second channel, then leaves with _exit
// without closing anything: the parent's next recv fails with the lost connection, not the 10 s timeout.
TEST(GlooChannel, TwoProcessesExchangeInOrderAndALostPeerClosesTheChannel) {
  test::ScratchDir dir("moerl-channel");
  const GlooOptions o = options("fork", milliseconds(10000));
  constexpr size_t kMessages = 5;
  const pid_t child = fork();
  ASSERT_GE(child, 0) << std::strerror(errno);
  if (child == 0) {
    alarm(30);  // a last resort should the parent vanish
    int code = 1;
    try {
      const GlooRendezvous r = GlooRendezvous::in_folder(dir.path);
      auto in = connect_gloo_channel(r, "parent -> child", ChannelEnd::kReceiver, o);
      auto out = connect_gloo_channel(r, "child -> parent", ChannelEnd::kSender, o);
      code = 0;
      for (size_t i = 0; i < kMessages; ++i) {
        std::vector<float> v(payload(i).size());
        in->recv(std::span<float>(v));
        if (v != payload(i)) code = 2;
        for (float& x : v) x += 1.0f;
        out->send(std::span<const float>(v));
      }
      // Wait until the parent has read every echo (its last message), so they are delivered before _exit.
      float done = 0;
      in->recv(&done, sizeof done);
    } catch (...) {
      code = 3;
    }
    _exit(code);
  }
  std::string error;
  std::string lost;
  try {
    const GlooRendezvous r = GlooRendezvous::in_folder(dir.path);
    auto out = connect_gloo_channel(r, "parent -> child", ChannelEnd::kSender, o);
    auto in = connect_gloo_channel(r, "child -> parent", ChannelEnd::kReceiver, o);
    for (size_t i = 0; i < kMessages; ++i) out->send(std::span<const float>(payload(i)));
    for (size_t i = 0; i < kMessages; ++i) {
      std::vector<float> v(payload(i).size());
      in->recv(std::span<float>(v));
      std::vector<float> want = payload(i);
      for (float& x : want) x += 1.0f;
      EXPECT_EQ(v, want) << "echo " << i;
    }
    const float done = 1;
    out->send(&done, sizeof done);
    const auto start = Clock::now();
    float more = 0;
    lost = error_of([&] { in->recv(&more, sizeof more); });
    EXPECT_LT(Clock::now() - start, std::chrono::seconds(5)) << "waited for the timeout instead";
  } catch (const Error& e) {
    error = e.what();
  }
  const std::optional<int> reaped = test::reap_by(child, std::chrono::steady_clock::now() + std::chrono::seconds(20));
  if (!reaped) FAIL() << "the child process did not finish within 20 s";
  const int status = *reaped;
  EXPECT_EQ(error, "");
  EXPECT_NE(lost.find("child -> parent"), std::string::npos) << lost;
  std::printf("after the peer left: %s\n", lost.c_str());
  EXPECT_EQ(lost.find("no message within"), std::string::npos) << lost;
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "child: 1 = died early, 2 = wrong message, 3 = channel error";
}

}  // namespace
}  // namespace moerl
