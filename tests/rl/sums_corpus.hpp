// Test data for the RL flow tests: a small corpus of sentences with sums ("we add 3+4=7 today."), so the BPE
// tokenizer learns digits, '+' and '=', and the OpenMP thread count that run_recipe changes, restored.
#pragma once
#include <omp.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>

#include <nlohmann/json.hpp>

namespace moerl::test {

// Writes <dir>/corpus.jsonl: 40 documents of 20 sentences, the same every time (seeded); returns its path.
inline std::filesystem::path write_sums_corpus(const std::filesystem::path& dir) {
  std::mt19937 rng(3);
  const std::filesystem::path file = dir / "corpus.jsonl";
  std::ofstream f(file);
  for (int d = 0; d < 40; ++d) {
    std::string text;
    for (int s = 0; s < 20; ++s) {
      const int a = static_cast<int>(rng() % 10), b = static_cast<int>(rng() % 10);
      text += "we add " + std::to_string(a) + "+" + std::to_string(b) + "=" + std::to_string(a + b) + " today. ";
    }
    f << nlohmann::json{{"text", text}}.dump() << "\n";
  }
  return file;
}

// run_recipe sets the process-wide OpenMP thread count: restored for the tests that follow in this binary.
struct RestoreThreads {
  int threads = omp_get_max_threads();
  ~RestoreThreads() { omp_set_num_threads(threads); }
};

}  // namespace moerl::test
