// Point-to-point data plane: one-way, in-order channels of messages between two parties — a pipeline stage
// and its neighbour (activations forward, their gradients back), a stage and an expert shard (token rows out
// and back). Tensors travel here, never through actor mailboxes; the control plane only says what to do.
//
// A message is a byte buffer. The receiver knows each message's size from the protocol (the micro-batch's
// shape, the expert counts it was sent first), as with Gloo's send/recv pairs, so a Gloo (or NCCL) channel can
// replace the in-process one without touching the parties. Sends never wait for the receiver.
#pragma once
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

namespace moerl {

class Channel {
 public:
  virtual ~Channel() = default;
  // Queues a copy of data[0, bytes) and returns.
  virtual void send(const void* data, size_t bytes) = 0;
  // Waits for the next message and copies it to data. Throws moerl::Error naming the channel when the message
  // is not `bytes` long, when nothing arrives within the channel's timeout, or when the channel was closed.
  virtual void recv(void* data, size_t bytes) = 0;
  // Wakes every waiting and future recv with an error carrying `why`: a failed party releases its peers.
  virtual void close(const std::string& why) = 0;
  virtual const std::string& name() const = 0;

  void send(std::span<const float> v) { send(v.data(), v.size_bytes()); }
  void send(std::span<const int64_t> v) { send(v.data(), v.size_bytes()); }
  void recv(std::span<float> v) { recv(v.data(), v.size_bytes()); }
  void recv(std::span<int64_t> v) { recv(v.data(), v.size_bytes()); }
};

// A channel between threads of one process: a queue of copied messages under a mutex.
std::shared_ptr<Channel> make_local_channel(std::string name,
                                            std::chrono::milliseconds timeout = std::chrono::seconds(60));

}  // namespace moerl
