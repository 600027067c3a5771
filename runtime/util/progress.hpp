// A progress bar on stderr for long work: "pretrain  [#####-----]  120/300  loss 3.412  12.3k tok/s  ETA 0:41".
// On a terminal it redraws one line; otherwise (CI, logs) it prints a line every ~10% so logs stay short.
#pragma once
#include <chrono>
#include <cstdint>
#include <string>

namespace moerl {

class ProgressBar {
 public:
  ProgressBar(std::string label, int64_t total, std::string unit = "tok");
  // Marks `done` items of `total` complete; `work` counts units (tokens) since the start for the rate;
  // `fields` is extra text such as "loss 3.41".
  void update(int64_t done, int64_t work, const std::string& fields);
  void finish(const std::string& fields);

 private:
  void draw(int64_t done, int64_t work, const std::string& fields, bool final);
  std::string label_, unit_;
  int64_t total_;
  bool tty_;
  int last_decile_ = -1;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

std::string format_duration(double seconds);  // "1:02:03" / "4:05"
std::string format_rate(double per_second);    // "12.3k"

}  // namespace moerl
