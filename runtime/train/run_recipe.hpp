// `moerl run`: every stage of a recipe in order, in this process. Writes into the run folder:
//   tokenizer.model, <stage>/ checkpoints, metrics.jsonl, summary.json, report.html (train/report.hpp).
// Re-running the same command resumes: finished stages are skipped, an interrupted one continues.
// The recipe's device picks the backend: the CPU's Model and AdamW, or for device: cuda the backend that
// `cuda` makes (the command line passes runtime/gpu's when the build has one).
#pragma once
#include <filesystem>

#include <nlohmann/json.hpp>

#include "runtime/recipe/recipe.hpp"
#include "runtime/train/backend.hpp"

namespace moerl {

// Returns the summary (also written to recipe.out / summary.json). Throws moerl::Error naming the recipe file
// when it asks for device: cuda and `cuda` is empty (a build without the CUDA backend).
nlohmann::json run_recipe(const Recipe& recipe, const BackendFactory& cuda = {});

// Texts of the recipe's corpus: Brown (fetched with scripts/fetch-brown.sh into data.dir when missing) or
// a JSONL file of {"text"} lines.
std::vector<std::string> load_corpus(const DataSpec& data);

}  // namespace moerl
