#include "bench/report.hpp"
#include "runtime/version.hpp"

#include <ctime>
#include <fstream>

namespace moerl::bench {

void Report::add(const std::string& bench, const std::string& metric, double value, const std::string& unit,
                 const std::string& stat, nlohmann::json extra) {
  nlohmann::json j = {{"bench", bench}, {"metric", metric}, {"value", value}, {"unit", unit}, {"stat", stat},
                      {"rev", git_revision()}, {"device", device_}, {"date", today()}};
  for (auto& [k, v] : extra.items()) j[k] = v;
  const std::string line = j.dump() + "\n";
  std::fputs(line.c_str(), stdout);
  std::fflush(stdout);
  if (file_) {
    std::fputs(line.c_str(), file_);
    std::fflush(file_);
  }
}

std::string cpu_name() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(' ', colon + 1));
    }
  return "cpu";
}

std::string today() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[16];
  std::strftime(buf, sizeof buf, "%Y-%m-%d", &tm);
  return buf;
}

}  // namespace moerl::bench
