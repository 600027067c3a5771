// A two-way switch read from the environment, for comparing two implementations of one step on the device
// (scripts/device-sweep.sh): `name` unset, empty or `usual` gives false, `other` gives true, anything else throws
// naming the variable and both values. Callers keep the answer in a function-local static (read once per process).
#pragma once
#include <cstdlib>
#include <string>

#include "runtime/error.hpp"

namespace moerl {

inline bool env_switch(const char* name, const char* usual, const char* other) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0' || std::string(v) == usual) return false;
  if (std::string(v) == other) return true;
  throw Error(std::string(name) + " must be " + usual + " or " + other + ", got " + v);
}

}  // namespace moerl
