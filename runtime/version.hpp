// The git revision the binary was built from (12 hex digits, "unknown" outside a git checkout), for
// `moerl --version`, benchmark records and metrics. Written at build time by cmake/git_rev.cmake.
#pragma once

namespace moerl {
const char* git_revision();
}  // namespace moerl
