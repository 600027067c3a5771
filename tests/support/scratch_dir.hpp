// A fresh folder under the system's temporary directory (mkdtemp), removed with everything in it at scope end:
// for rendezvous folders and files that tests running side by side must not share.
#pragma once
#include <stdlib.h>

#include <filesystem>
#include <string>

namespace moerl::test {

struct ScratchDir {
  std::filesystem::path path;

  // The folder is <tmp>/<prefix>-XXXXXX.
  explicit ScratchDir(const std::string& prefix) {
    std::string pattern = (std::filesystem::temp_directory_path() / (prefix + "-XXXXXX")).string();
    if (!mkdtemp(pattern.data())) std::abort();
    path = pattern;
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
};

}  // namespace moerl::test
