// A user-facing failure: bad input, a malformed file, a missing tensor. The message names the file,
// field or request and what was expected; `moerl` prints it as one line and exits with code 1.
#pragma once
#include <stdexcept>
#include <string>
#include <type_traits>

namespace moerl {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Throws Error(message) when `ok` is false. For checks on input we do not control.
inline void require(bool ok, const std::string& message) {
  if (!ok) throw Error(message);
}

// The same with the message made only on failure (make_message() returns it): for checks that run per element or
// per kernel launch, where building the message every time costs more host time than the work checked. (The GPU
// training step built thousands a step, and 2 x 16384 for its token ids alone: a 0.85 ms idle GPU at every step
// boundary in bench/results/2026-11-30-gpu-trace-h200-bf6c5d9-4ee10af.txt.)
template <class MakeMessage, class = std::enable_if_t<std::is_invocable_r_v<std::string, MakeMessage&>>>
inline void require(bool ok, MakeMessage&& make_message) {
  if (!ok) throw Error(make_message());
}

}  // namespace moerl
