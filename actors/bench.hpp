// Micro-benchmarks of the actor runtime in one process, for `moerl bench actors`.
#pragma once
#include <cstdint>

namespace moerl::actors {

// Median microseconds of one request/response between two event-based actors of one actor system: the
// request carries an Envelope of `payload_bytes`, the reply echoes it. `trips` timed after `warmup` untimed.
double roundtrip_local_us(int trips = 20000, int warmup = 2000, int payload_bytes = 64);

// One-way messages per second from one actor to another in one process: `messages` sends of (atom, uint64),
// timed until the receiver has counted the last. Median of `runs`.
double throughput_local_msgs_per_s(int64_t messages = 2000000, int runs = 3);

}  // namespace moerl::actors
