#include "runtime/util/progress.hpp"

#include <unistd.h>

#include <cmath>
#include <cstdio>

namespace moerl {

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const auto s = static_cast<int64_t>(seconds + 0.5);
  char buf[32];
  if (s >= 3600)
    std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", static_cast<long long>(s / 3600),
                  static_cast<long long>(s / 60 % 60), static_cast<long long>(s % 60));
  else
    std::snprintf(buf, sizeof buf, "%lld:%02lld", static_cast<long long>(s / 60), static_cast<long long>(s % 60));
  return buf;
}

std::string format_rate(double v) {
  char buf[32];
  if (v >= 1e6) std::snprintf(buf, sizeof buf, "%.2fM", v / 1e6);
  else if (v >= 1e3) std::snprintf(buf, sizeof buf, "%.1fk", v / 1e3);
  else std::snprintf(buf, sizeof buf, "%.1f", v);
  return buf;
}

ProgressBar::ProgressBar(std::string label, int64_t total, std::string unit)
    : label_(std::move(label)), unit_(std::move(unit)), total_(total), tty_(isatty(STDERR_FILENO) != 0),
      start_(std::chrono::steady_clock::now()), last_draw_(start_) {}

void ProgressBar::update(int64_t done, int64_t work, const std::string& fields) {
  const auto now = std::chrono::steady_clock::now();
  if (tty_) {
    if (now - last_draw_ < std::chrono::milliseconds(100) && done < total_) return;
  } else {
    const int decile = total_ > 0 ? static_cast<int>(10 * done / total_) : 10;
    if (decile == last_decile_) return;
    last_decile_ = decile;
  }
  last_draw_ = now;
  draw(done, work, fields, false);
}

void ProgressBar::finish(const std::string& fields) { draw(total_, -1, fields, true); }

void ProgressBar::draw(int64_t done, int64_t work, const std::string& fields, bool final) {
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  constexpr int kWidth = 24;
  const int filled = total_ > 0 ? static_cast<int>(kWidth * std::min<int64_t>(done, total_) / total_) : kWidth;
  std::string bar(static_cast<size_t>(filled), '#');
  bar.append(static_cast<size_t>(kWidth - filled), '-');
  std::string rate;
  if (work >= 0 && elapsed > 0) rate = "  " + format_rate(static_cast<double>(work) / elapsed) + " " + unit_ + "/s";
  const double eta = done > 0 ? elapsed * static_cast<double>(total_ - done) / static_cast<double>(done) : NAN;
  std::string tail = final ? "  " + format_duration(elapsed) : "  ETA " + format_duration(eta);
  std::fprintf(stderr, "%s%-10s [%s] %lld/%lld  %s%s%s%s", tty_ ? "\r\033[K" : "", label_.c_str(), bar.c_str(),
               static_cast<long long>(done), static_cast<long long>(total_), fields.c_str(), rate.c_str(), tail.c_str(),
               tty_ && !final ? "" : "\n");
  std::fflush(stderr);
}

}  // namespace moerl
