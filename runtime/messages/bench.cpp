#include "runtime/messages/bench.hpp"

#include <algorithm>
#include <chrono>
#include <vector>

#include "runtime/error.hpp"
#include "runtime/messages/codec.hpp"

namespace moerl::msg {

double capnp_batch_roundtrip_us(int tokens, int runs) {
  require(tokens > 0 && runs > 0, "capnp_batch_roundtrip_us: tokens and runs must be positive");
  constexpr int32_t kVocab = 129280;  // DeepSeek-V3's vocabulary
  TokenBatch batch{StepId{"bench", 1}, 1, static_cast<uint32_t>(tokens), {}, {}};
  batch.ids.resize(static_cast<size_t>(tokens));
  batch.labels.resize(static_cast<size_t>(tokens));
  for (int i = 0; i < tokens; ++i) {
    batch.ids[static_cast<size_t>(i)] = static_cast<int32_t>((i * 7919LL) % kVocab);
    batch.labels[static_cast<size_t>(i)] =
        i < tokens / 4 ? kNoLossLabel : static_cast<int32_t>((i * 104729LL) % kVocab);
  }
  DecodeLimits limits;
  limits.vocab = kVocab;

  std::vector<double> us;
  us.reserve(static_cast<size_t>(runs));
  size_t checksum = 0;  // keeps the work observable
  for (int r = -5; r < runs; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    const std::vector<uint8_t> bytes = encode(batch);
    const TokenBatch back = decode_token_batch(bytes, limits);
    const auto t1 = std::chrono::steady_clock::now();
    checksum += back.ids.size() + bytes.size();
    if (r >= 0) us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
  }
  require(checksum > 0, "capnp_batch_roundtrip_us: nothing decoded");
  std::nth_element(us.begin(), us.begin() + static_cast<long>(us.size() / 2), us.end());
  return us[us.size() / 2];
}

}  // namespace moerl::msg
