// Micro-benchmark of the message codec, for `moerl bench actors`.
#pragma once

namespace moerl::msg {

// Median wall time in microseconds of encode() + decode_token_batch() of one TokenBatch holding `tokens`
// ids and as many labels (one sequence of `tokens`), over `runs` repetitions after a few warm-up ones.
double capnp_batch_roundtrip_us(int tokens, int runs = 501);

}  // namespace moerl::msg
