#include "runtime/train/report.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <vector>

#include "runtime/util/files.hpp"

namespace moerl {
namespace {

// The curves worth a chart, in display order.
const char* const kCurves[] = {"loss",      "validation_loss", "heldout_loss", "accuracy",     "heldout_accuracy",
                               "margin",    "log_ratio_margin", "reward",      "kl",           "task_accuracy",
                               "checker_accuracy", "mtp_loss"};
// Summary table columns: (key in a stage's summary, heading).
const std::pair<const char*, const char*> kColumns[] = {
    {"kind", "kind"},           {"steps", "steps"},
    {"train_loss", "loss"},     {"validation_loss", "validation loss"},
    {"reward", "reward"},       {"kl_to_reference", "KL"},
    {"task_accuracy", "task accuracy"}, {"rm_heldout_accuracy", "RM held-out accuracy"},
    {"wall_s", "wall s"}};

std::string escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '&': out += "&amp;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

std::string number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, std::fabs(v) >= 1000 || v == std::floor(v) ? "%.0f" : "%.4g", v);
  return buf;
}

std::string cell(const nlohmann::json& v) {
  if (v.is_number()) return number(v.get<double>());
  if (v.is_string()) return escape(v.get<std::string>());
  return escape(v.dump());
}

// One line chart: points (step, value), axes with their ranges.
std::string svg_chart(const std::string& title, const std::vector<std::pair<double, double>>& pts) {
  const double W = 420, H = 180, L = 56, R = 12, T = 24, B = 28;
  double x0 = pts.front().first, x1 = x0, y0 = pts.front().second, y1 = y0;
  for (const auto& [x, y] : pts) {
    x0 = std::min(x0, x); x1 = std::max(x1, x);
    y0 = std::min(y0, y); y1 = std::max(y1, y);
  }
  if (x1 == x0) x1 = x0 + 1;
  if (y1 == y0) { y0 -= 0.5; y1 += 0.5; }
  auto px = [&](double x) { return L + (x - x0) / (x1 - x0) * (W - L - R); };
  auto py = [&](double y) { return T + (y1 - y) / (y1 - y0) * (H - T - B); };
  std::string s = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + number(W) + "\" height=\"" + number(H) +
                  "\" viewBox=\"0 0 " + number(W) + " " + number(H) + "\">";
  s += "<text x=\"" + number(L) + "\" y=\"16\" class=\"t\">" + escape(title) + "</text>";
  s += "<rect x=\"" + number(L) + "\" y=\"" + number(T) + "\" width=\"" + number(W - L - R) + "\" height=\"" +
       number(H - T - B) + "\" class=\"f\"/>";
  s += "<text x=\"" + number(L - 4) + "\" y=\"" + number(T + 10) + "\" class=\"a\" text-anchor=\"end\">" + number(y1) + "</text>";
  s += "<text x=\"" + number(L - 4) + "\" y=\"" + number(H - B) + "\" class=\"a\" text-anchor=\"end\">" + number(y0) + "</text>";
  s += "<text x=\"" + number(L) + "\" y=\"" + number(H - 10) + "\" class=\"a\">" + number(x0) + "</text>";
  s += "<text x=\"" + number(W - R) + "\" y=\"" + number(H - 10) + "\" class=\"a\" text-anchor=\"end\">step " + number(x1) + "</text>";
  s += "<polyline class=\"l\" points=\"";
  for (const auto& [x, y] : pts) s += number(px(x)) + "," + number(py(y)) + " ";
  s += "\"/>";
  if (pts.size() == 1) s += "<circle class=\"d\" r=\"3\" cx=\"" + number(px(pts[0].first)) + "\" cy=\"" + number(py(pts[0].second)) + "\"/>";
  return s + "</svg>";
}

}  // namespace

std::string render_html_report(const std::filesystem::path& metrics_jsonl, const nlohmann::json& summary) {
  // stage -> curve -> points, stages in first-seen order.
  std::vector<std::string> order;
  std::map<std::string, std::map<std::string, std::vector<std::pair<double, double>>>> curves;
  std::ifstream in(metrics_jsonl);
  std::string line;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_object() || !j.contains("stage") || !j["stage"].is_string() || !j.contains("step") ||
        !j["step"].is_number())
      continue;
    const std::string stage = j["stage"].get<std::string>();
    if (!curves.count(stage)) order.push_back(stage);
    auto& c = curves[stage];
    for (const char* key : kCurves)
      if (j.contains(key) && j[key].is_number()) c[key].emplace_back(j["step"].get<double>(), j[key].get<double>());
  }
  std::string h = "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>moerl run " +
                  escape(summary.value("name", std::string("run"))) + "</title><style>"
                  "body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse}"
                  "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
                  ".t{font-size:13px;font-weight:bold}.a{font-size:10px;fill:#555}.f{fill:#fafafa;stroke:#ccc}"
                  ".l{fill:none;stroke:#1f77b4;stroke-width:1.5}.d{fill:#1f77b4}svg{margin:4px}</style></head><body>\n";
  h += "<h1>moerl run: " + escape(summary.value("name", std::string("run"))) + "</h1>\n";
  h += "<p>recipe " + escape(summary.value("recipe", std::string("?"))) + ", precision " +
       escape(summary.value("precision", std::string("?"))) + ", wall time " +
       (summary.contains("wall_s") ? number(summary["wall_s"].get<double>()) + " s" : std::string("?")) + "</p>\n";
  h += "<h2>Stages</h2>\n<table><tr><th>stage</th>";
  for (const auto& [key, head] : kColumns) h += "<th>" + std::string(head) + "</th>";
  h += "</tr>\n";
  if (summary.contains("stages"))
    for (const auto& s : summary["stages"]) {
      h += "<tr><td>" + cell(s.value("stage", nlohmann::json("?"))) + "</td>";
      for (const auto& [key, head] : kColumns) h += "<td>" + (s.contains(key) ? cell(s[key]) : std::string("")) + "</td>";
      h += "</tr>\n";
    }
  h += "</table>\n";
  for (const auto& stage : order) {
    h += "<h2>" + escape(stage) + "</h2>\n<div>";
    for (const char* key : kCurves) {
      const auto it = curves[stage].find(key);
      if (it != curves[stage].end() && !it->second.empty()) h += svg_chart(key, it->second);
    }
    h += "</div>\n";
  }
  return h + "</body></html>\n";
}

std::string render_text_table(const nlohmann::json& summary) {
  // (key, heading, printf format); numbers only, blank where a stage has no such field.
  struct Column {
    const char* key;
    const char* head;
    const char* format;
  };
  static const Column columns[] = {{"train_loss", "loss", "%.3f"},          {"reward", "reward", "%.3f"},
                                   {"kl_to_reference", "KL", "%.4f"},       {"task_accuracy", "task acc", "%.3f"},
                                   {"rm_heldout_accuracy", "RM acc", "%.3f"}, {"wall_s", "wall s", "%.1f"}};
  char line[256];
  std::snprintf(line, sizeof line, "%-12s %-12s", "stage", "kind");
  std::string t = line;
  for (const auto& c : columns) {
    std::snprintf(line, sizeof line, " %10s", c.head);
    t += line;
  }
  t += "\n";
  if (summary.contains("stages"))
    for (const auto& s : summary["stages"]) {
      std::snprintf(line, sizeof line, "%-12s %-12s", s.value("stage", std::string("?")).c_str(),
                    s.value("kind", std::string("?")).c_str());
      t += line;
      for (const auto& c : columns) {
        char value[64] = "";
        if (s.contains(c.key) && s[c.key].is_number()) std::snprintf(value, sizeof value, c.format, s[c.key].get<double>());
        std::snprintf(line, sizeof line, " %10s", value);
        t += line;
      }
      t += "\n";
    }
  for (const char* key : {"task_accuracy_sft", "task_accuracy_rlhf", "rm_heldout_accuracy", "kl_to_reference", "wall_s"})
    if (summary.contains(key) && summary[key].is_number()) {
      std::snprintf(line, sizeof line, "%s %.4g\n", key, summary[key].get<double>());
      t += line;
    }
  return t;
}

void write_html_report(const std::filesystem::path& out, const nlohmann::json& summary) {
  write_file_durably(out / "report.html", render_html_report(out / "metrics.jsonl", summary));
  const std::string table = render_text_table(summary);
  write_file_durably(out / "report.txt", table);
  std::fprintf(stderr, "\n%s\n", table.c_str());
}

}  // namespace moerl
