// Metrics as JSON lines: one object per event, flushed as written, so a crash loses at most the last line.
#pragma once
#include <cstdio>
#include <filesystem>

#include <nlohmann/json.hpp>

namespace moerl {

class MetricsLog {
 public:
  MetricsLog() = default;  // discards everything
  explicit MetricsLog(const std::filesystem::path& file);  // appends
  ~MetricsLog();
  MetricsLog(const MetricsLog&) = delete;
  MetricsLog& operator=(const MetricsLog&) = delete;
  void write(const nlohmann::json& record);

 private:
  std::FILE* file_ = nullptr;
};

}  // namespace moerl
