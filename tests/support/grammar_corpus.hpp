// A small text corpus for training tests: 60 documents of 12 sentences each, drawn from a tiny grammar with a
// fixed seed (the same bytes on every run): learnable structure, and enough text for a 300-piece BPE.
#pragma once
#include <filesystem>
#include <fstream>
#include <random>
#include <string>

#include <nlohmann/json.hpp>

namespace moerl::test {

// Writes the corpus to `file` as JSON lines {"text": ...}; returns file.
inline std::filesystem::path write_grammar_corpus(const std::filesystem::path& file) {
  const char* subjects[] = {"the cat", "a dog", "my friend", "the old man", "our teacher", "the child"};
  const char* verbs[] = {"sees", "likes", "finds", "carries", "paints", "follows"};
  const char* objects[] = {"the red ball", "a small house", "the river", "an apple", "the green door", "a letter"};
  std::mt19937 rng(42);
  std::ofstream f(file);
  for (int d = 0; d < 60; ++d) {
    std::string text;
    for (int s = 0; s < 12; ++s)
      text += std::string(subjects[rng() % 6]) + " " + verbs[rng() % 6] + " " + objects[rng() % 6] + ". ";
    f << nlohmann::json{{"text", text}}.dump() << "\n";
  }
  return file;
}

}  // namespace moerl::test
