#include "runtime/parallel/channel_gloo.hpp"

#include <gloo/rendezvous/context.h>
#include <gloo/transport/unbound_buffer.h>

#include <cctype>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "runtime/error.hpp"
#include "runtime/parallel/gloo_context.hpp"

namespace moerl {
namespace {

using Buffer = std::unique_ptr<gloo::transport::UnboundBuffer>;

constexpr int kSenderRank = 0, kReceiverRank = 1;
constexpr uint64_t kSlot = 1;  // the channel's context carries nothing else
// Header bit 63: a close notice; the low bits are then the length of the reason that follows.
constexpr uint64_t kCloseMark = uint64_t{1} << 63;
// How long the receiver's thread waits for the next header: a channel may idle between steps for as long as
// the run likes, and a Gloo wait that times out breaks its context, so this is "forever" (30 days); the
// destructor ends the wait by aborting it.
constexpr std::chrono::milliseconds kIdleWait = std::chrono::hours(24 * 30);

std::string store_key(const std::string& name) {
  std::string key = name;
  for (char& c : key)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') c = '_';
  return key;
}

class GlooChannel final : public Channel {
 public:
  GlooChannel(std::string name, ChannelEnd end, std::shared_ptr<gloo::rendezvous::Context> context,
              std::chrono::milliseconds timeout)
      : name_(std::move(name)), end_(end), ctx_(std::move(context)), timeout_(timeout) {
    io_ = std::thread([this] { end_ == ChannelEnd::kSender ? send_loop() : receive_loop(); });
  }

  ~GlooChannel() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;  // the sender's thread still delivers what is queued (each within the timeout)
      if (pending_recv_ != nullptr) pending_recv_->abortWaitRecv();
    }
    changed_.notify_all();
    io_.join();
  }

  void send(const void* data, size_t bytes) override {
    require(end_ == ChannelEnd::kSender, "channel " + name_ + ": this is its receiving end; it cannot send");
    std::vector<std::byte> message(bytes);
    if (bytes) std::memcpy(message.data(), data, bytes);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!closed_.empty()) throw Error("channel " + name_ + ": send after close (" + closed_ + ")");
      queue_.push_back({bytes, std::move(message)});
    }
    changed_.notify_all();
  }

  void recv(void* data, size_t bytes) override {
    require(end_ == ChannelEnd::kReceiver, "channel " + name_ + ": this is its sending end; it cannot receive");
    std::unique_lock<std::mutex> lock(mutex_);
    if (!changed_.wait_for(lock, timeout_, [&] { return !queue_.empty() || !closed_.empty(); }))
      throw Error("channel " + name_ + ": no message within " + std::to_string(timeout_.count()) + " ms");
    if (queue_.empty()) throw Error("channel " + name_ + " closed: " + closed_);
    std::vector<std::byte> message = std::move(queue_.front().bytes);
    queue_.pop_front();
    lock.unlock();
    if (message.size() != bytes)
      throw Error("channel " + name_ + ": received a message of " + std::to_string(message.size()) +
                  " bytes, the protocol expects " + std::to_string(bytes));
    if (bytes) std::memcpy(data, message.data(), bytes);
  }

  void close(const std::string& why) override {
    const std::string reason = why.empty() ? "closed" : why;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!closed_.empty()) return;
      closed_ = reason;
      if (end_ == ChannelEnd::kSender) {
        // Delivered after the queued messages: the receiver reads those, then fails with the reason.
        std::vector<std::byte> text(reason.size());
        std::memcpy(text.data(), reason.data(), reason.size());
        queue_.push_back({kCloseMark | reason.size(), std::move(text)});
      }
      // A receiving end goes on receiving (and dropping) until it is destroyed, so the peer's queued sends
      // still complete instead of waiting out their timeout.
    }
    changed_.notify_all();
  }

  const std::string& name() const override { return name_; }

 private:
  struct Message {
    uint64_t header;  // the size in bytes, or kCloseMark | the reason's size
    std::vector<std::byte> bytes;
  };

  // Sender's thread: each queued message in order, header then bytes, waiting for both to be delivered.
  void send_loop() {
    for (;;) {
      Message m;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        changed_.wait(lock, [&] { return !queue_.empty() || stopping_; });
        if (queue_.empty()) return;
        m = std::move(queue_.front());
        queue_.pop_front();
      }
      try {
        Buffer header = ctx_->createUnboundBuffer(&m.header, sizeof m.header);
        header->send(kReceiverRank, kSlot);
        Buffer body;
        if (!m.bytes.empty()) {
          body = ctx_->createUnboundBuffer(m.bytes.data(), m.bytes.size());
          body->send(kReceiverRank, kSlot);
        }
        header->waitSend(timeout_);
        if (body) body->waitSend(timeout_);
      } catch (const std::exception& e) {
        // The peer is gone or stuck: later sends fail with the cause (nothing more can be delivered in order).
        std::lock_guard<std::mutex> lock(mutex_);
        if (closed_.empty()) closed_ = std::string("delivery failed: ") + e.what();
        queue_.clear();
        return;
      }
    }
  }

  // Receiver's thread: every message as it arrives, into the queue; a close notice or a lost peer closes.
  void receive_loop() {
    try {
      for (;;) {
        uint64_t header = 0;
        if (!receive(&header, sizeof header, kIdleWait)) return;
        const bool notice = (header & kCloseMark) != 0;
        const uint64_t size = header & ~kCloseMark;
        std::vector<std::byte> bytes(size);
        if (size > 0 && !receive(bytes.data(), size, timeout_)) return;
        {
          std::lock_guard<std::mutex> lock(mutex_);
          if (notice) {
            if (closed_.empty()) closed_ = std::string(reinterpret_cast<const char*>(bytes.data()), size);
          } else if (closed_.empty()) {
            queue_.push_back({size, std::move(bytes)});
          }
        }
        changed_.notify_all();
        if (notice) return;
      }
    } catch (const std::exception& e) {
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (closed_.empty()) closed_ = std::string("the connection to the sender failed: ") + e.what();
      }
      changed_.notify_all();
    }
  }

  // One receive into p[0, n); false when the destructor aborted it.
  bool receive(void* p, size_t n, std::chrono::milliseconds wait) {
    Buffer b = ctx_->createUnboundBuffer(p, n);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (stopping_) return false;
      pending_recv_ = b.get();
    }
    bool done = false;
    try {
      b->recv(kSenderRank, kSlot);
      done = b->waitRecv(wait);  // an abort before this wait still makes it return false
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      pending_recv_ = nullptr;  // b dies here: close and the destructor must not reach it
      throw;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    pending_recv_ = nullptr;
    return done && !stopping_;
  }

  const std::string name_;
  const ChannelEnd end_;
  std::shared_ptr<gloo::rendezvous::Context> ctx_;
  const std::chrono::milliseconds timeout_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<Message> queue_;  // sender: to deliver; receiver: received, not yet read
  std::string closed_;         // non-empty once closed: the reason
  bool stopping_ = false;      // the thread should end (receiver: at once; sender: once the queue is empty)
  gloo::transport::UnboundBuffer* pending_recv_ = nullptr;  // the receiver thread's current receive
  std::thread io_;
};

}  // namespace

std::shared_ptr<Channel> connect_gloo_channel(const GlooRendezvous& rendezvous, std::string name, ChannelEnd end,
                                              const GlooOptions& options) {
  GlooOptions o = options;
  o.prefix = options.prefix + "." + store_key(name);
  const int rank = end == ChannelEnd::kSender ? kSenderRank : kReceiverRank;
  std::shared_ptr<gloo::rendezvous::Context> context;
  try {
    context = connect_gloo_context(rendezvous, rank, 2, o);
  } catch (const Error& e) {
    throw Error("channel " + name + " (" + (end == ChannelEnd::kSender ? "sending" : "receiving") +
                " end): " + e.what());
  }
  return std::make_shared<GlooChannel>(std::move(name), end, std::move(context), options.timeout);
}

}  // namespace moerl
