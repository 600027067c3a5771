// The cluster's round-trip benchmark (`moerl bench actors`, metric roundtrip_remote_us): a head in this process
// and a `moerl node` child process on loopback; an actor here sends a request to the node's echo role and
// waits for the answer, one at a time.
#pragma once
#include <chrono>
#include <string>

namespace moerl::cluster {

struct RemoteRoundTrip {
  double median_us = 0, p10_us = 0, p90_us = 0;  // request to response, microseconds
  int samples = 0;
};

// Starts `moerl_binary node --join ...` (this program: pass /proc/self/exe), times `samples` round trips after
// `warmup` untimed ones, ends the node. Both processes use CAF's `scheduler` and `idle_spin` (NetOptions). Throws
// moerl::Error when the node does not join within 30 s.
RemoteRoundTrip measure_remote_roundtrip(const std::string& moerl_binary, int samples, int warmup,
                                         const std::string& scheduler, std::chrono::microseconds idle_spin);

}  // namespace moerl::cluster
