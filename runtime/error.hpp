// A user-facing failure: bad input, a malformed file, a missing tensor. The message names the file,
// field or request and what was expected; `moerl` prints it as one line and exits with code 1.
#pragma once
#include <stdexcept>
#include <string>

namespace moerl {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Throws Error(message) when `ok` is false. For checks on input we do not control.
inline void require(bool ok, const std::string& message) {
  if (!ok) throw Error(message);
}

}  // namespace moerl
