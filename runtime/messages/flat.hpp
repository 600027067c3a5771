// Internal to runtime/messages: a built Cap'n Proto message as the bytes every moerl message travels in (its
// segments framed as capnp::writeMessage writes them). kj::Exception passes through to the caller, which names
// the message kind.
#pragma once
#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/io.h>

#include <cstdint>
#include <vector>

namespace moerl::msg {

inline std::vector<uint8_t> flat_bytes(capnp::MessageBuilder& message) {
  auto segments = message.getSegmentsForOutput();
  std::vector<uint8_t> out(capnp::computeSerializedSizeInWords(segments) * sizeof(capnp::word));
  kj::ArrayOutputStream stream(kj::arrayPtr(out.data(), out.size()));
  capnp::writeMessage(stream, segments);
  return out;
}

}  // namespace moerl::msg
