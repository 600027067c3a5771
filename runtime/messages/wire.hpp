// Internal to runtime/messages: the generated Cap'n Proto types and the correspondence of their enums with
// the plain ones of types.hpp (same order by construction; the static_asserts pin it).
#pragma once
#include <cstdint>

#include "runtime/messages/types.hpp"
#include "schemas/common.capnp.h"
#include "schemas/feedback.capnp.h"
#include "schemas/rollout.capnp.h"
#include "schemas/training.capnp.h"

namespace moerl::msg::wire_enums {

// Number of values of each enum; a decoded raw value at or above it is unknown.
inline constexpr uint16_t kDTypes = 7, kDevices = 2, kTransports = 4, kCollectives = 7, kErrorCodes = 5,
                          kChecksumKinds = 2, kFinishReasons = 3, kChoices = 3;

template <class Plain, class Wire>
constexpr bool same_value(Plain p, Wire w) {
  return static_cast<uint16_t>(p) == static_cast<uint16_t>(w);
}
static_assert(same_value(DType::F8_E4M3, wire::DType::F8_E4M3) && same_value(DType::U8, wire::DType::U8));
static_assert(same_value(Device::CUDA, wire::DeviceKind::CUDA));
static_assert(same_value(Transport::Gloo, wire::Transport::GLOO));
static_assert(same_value(Collective::AllToAll, wire::Collective::ALL_TO_ALL) &&
              same_value(Collective::ReduceScatter, wire::Collective::REDUCE_SCATTER));
static_assert(same_value(ErrorCode::StaleVersion, wire::ErrorCode::STALE_VERSION));
static_assert(same_value(ChecksumKind::Crc32c, wire::ChecksumKind::CRC32C));
static_assert(same_value(FinishReason::Aborted, wire::FinishReason::ABORTED));
static_assert(same_value(Choice::Tie, wire::Choice::TIE));
static_assert(kFeedbackSchemaVersion == wire::CURRENT_SCHEMA_VERSION);

template <class Wire, class Plain>
Wire to_wire(Plain p) {
  return static_cast<Wire>(static_cast<uint16_t>(p));
}

}  // namespace moerl::msg::wire_enums
