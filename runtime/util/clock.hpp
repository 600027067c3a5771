// Wall-clock seconds for stage summaries and step timings.
#pragma once
#include <chrono>

namespace moerl {

// Seconds from t0 until now, on the steady clock.
inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace moerl
