// splitmix64 (Steele, Lea, Flood 2014): one step of a 64-bit mixing function. Spreads nearby seeds (a run's seed
// plus a stage, epoch or problem index) over the whole seed space, so they give unrelated random streams.
#pragma once
#include <cstdint>

namespace moerl {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

}  // namespace moerl
