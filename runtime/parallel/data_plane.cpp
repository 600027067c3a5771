#include "runtime/parallel/data_plane.hpp"

#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <vector>

#include "runtime/error.hpp"

namespace moerl {
namespace {

class LocalChannel final : public Channel {
 public:
  LocalChannel(std::string name, std::chrono::milliseconds timeout) : name_(std::move(name)), timeout_(timeout) {}

  void send(const void* data, size_t bytes) override {
    std::vector<std::byte> message(bytes);
    if (bytes) std::memcpy(message.data(), data, bytes);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!closed_.empty()) throw Error("channel " + name_ + ": send after close (" + closed_ + ")");
      queue_.push_back(std::move(message));
    }
    ready_.notify_one();
  }

  void recv(void* data, size_t bytes) override {
    std::unique_lock<std::mutex> lock(mutex_);
    if (!ready_.wait_for(lock, timeout_, [&] { return !queue_.empty() || !closed_.empty(); }))
      throw Error("channel " + name_ + ": no message within " + std::to_string(timeout_.count()) + " ms");
    if (queue_.empty()) throw Error("channel " + name_ + " closed: " + closed_);
    std::vector<std::byte> message = std::move(queue_.front());
    queue_.pop_front();
    lock.unlock();
    if (message.size() != bytes)
      throw Error("channel " + name_ + ": received a message of " + std::to_string(message.size()) +
                  " bytes, the protocol expects " + std::to_string(bytes));
    if (bytes) std::memcpy(data, message.data(), bytes);
  }

  void close(const std::string& why) override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (closed_.empty()) closed_ = why.empty() ? "closed" : why;
    }
    ready_.notify_all();
  }

  const std::string& name() const override { return name_; }

 private:
  const std::string name_;
  const std::chrono::milliseconds timeout_;
  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::vector<std::byte>> queue_;
  std::string closed_;  // non-empty once closed: the reason
};

}  // namespace

std::shared_ptr<Channel> make_local_channel(std::string name, std::chrono::milliseconds timeout) {
  return std::make_shared<LocalChannel>(std::move(name), timeout);
}

}  // namespace moerl
