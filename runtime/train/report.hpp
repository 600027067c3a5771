// The run's HTML report: one self-contained file (inline SVG charts and CSS; no script, font or network
// request), written beside summary.json. Per stage, a chart of each curve metrics.jsonl holds for it (loss,
// validation loss, reward-model and DPO accuracy/margins, reward, KL, task accuracy), then the summary table
// (per stage: loss, reward, KL, task accuracy, held-out pairwise accuracy, wall time).
#pragma once
#include <filesystem>
#include <string>

#include <nlohmann/json.hpp>

namespace moerl {

// Renders the report from the metrics file's lines and the run summary (run_recipe's).
std::string render_html_report(const std::filesystem::path& metrics_jsonl, const nlohmann::json& summary);
// The final table, plain text: one row per stage (loss, reward, KL, task accuracy, RM held-out accuracy, wall
// time), then the run's headline fields (task_accuracy_sft/_rlhf, rm_heldout_accuracy, kl_to_reference, wall_s).
std::string render_text_table(const nlohmann::json& summary);
// Writes <out>/report.html and <out>/report.txt (the table; durably) and prints the table on stderr.
void write_html_report(const std::filesystem::path& out, const nlohmann::json& summary);

}  // namespace moerl
