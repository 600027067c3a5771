// `moerl run`: every stage of a recipe in order, in this process. Writes into the run folder:
//   tokenizer.model, <stage>/ checkpoints, metrics.jsonl, summary.json.
// Re-running the same command resumes: finished stages are skipped, an interrupted one continues.
#pragma once
#include <filesystem>

#include <nlohmann/json.hpp>

#include "runtime/recipe/recipe.hpp"

namespace moerl {

// Returns the summary (also written to recipe.out / summary.json).
nlohmann::json run_recipe(const Recipe& recipe);

// Texts of the recipe's corpus: Brown (fetched with scripts/fetch-brown.sh into data.dir when missing) or
// a JSONL file of {"text"} lines.
std::vector<std::string> load_corpus(const DataSpec& data);

}  // namespace moerl
