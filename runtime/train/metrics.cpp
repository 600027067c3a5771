#include "runtime/train/metrics.hpp"

#include "runtime/error.hpp"

namespace moerl {

MetricsLog::MetricsLog(const std::filesystem::path& file) : file_(std::fopen(file.c_str(), "a")) {
  require(file_ != nullptr, file.string() + ": cannot open the metrics file for appending");
}

MetricsLog::~MetricsLog() {
  if (file_) std::fclose(file_);
}

void MetricsLog::write(const nlohmann::json& record) {
  if (!file_) return;
  const std::string line = record.dump() + "\n";
  std::fwrite(line.data(), 1, line.size(), file_);
  std::fflush(file_);
}

}  // namespace moerl
