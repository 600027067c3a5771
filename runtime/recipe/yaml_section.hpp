// Checked reading of one YAML mapping of a recipe: every read names "file:line: field path" in its error,
// and unknown keys are refused (a typo must not silently fall back to a default).
#pragma once
#include <set>
#include <string>
#include <vector>

#include <yaml-cpp/yaml.h>

#include "runtime/error.hpp"

namespace moerl {

class YamlSection {
 public:
  YamlSection(YAML::Node node, std::string file, std::string path);

  bool has(const std::string& key) const;
  // The value of `key` converted to T, or `fallback` when the key is absent.
  template <class T> T get(const std::string& key, const T& fallback);
  template <class T> T required(const std::string& key);
  YamlSection section(const std::string& key);   // a nested mapping (an empty one when absent)
  std::vector<YamlSection> list(const std::string& key);  // a sequence of mappings
  YAML::Node raw(const std::string& key);         // marks the key used
  // Throws naming the first key that no get/section/list asked for.
  void refuse_unknown() const;

  [[noreturn]] void fail(const std::string& key, const std::string& what) const;
  std::string where(const std::string& key) const;  // "recipes/x.yaml:12: stages[0].steps"
  const std::string& path() const { return path_; }

 private:
  std::string child_path(const std::string& key) const { return path_.empty() ? key : path_ + "." + key; }
  YAML::Node node_;
  std::string file_, path_;
  std::set<std::string> used_;
};

template <class T> T YamlSection::get(const std::string& key, const T& fallback) {
  used_.insert(key);
  if (!has(key)) return fallback;
  const YAML::Node v = node_[key];
  try {
    if (!v.IsScalar()) throw YAML::Exception(v.Mark(), "");
    if constexpr (std::is_same_v<T, bool>) {
      const std::string s = v.as<std::string>();
      if (s != "true" && s != "false") throw YAML::Exception(v.Mark(), "");
    }
    return v.as<T>();
  } catch (const YAML::Exception&) {
    const char* expected = std::is_same_v<T, bool> ? "true or false"
                           : std::is_integral_v<T> ? "an integer"
                           : std::is_floating_point_v<T> ? "a number" : "a string";
    fail(key, std::string("expected ") + expected + ", got " + (v.IsScalar() ? "\"" + v.Scalar() + "\"" : "a " +
                                                                  std::string(v.IsMap() ? "mapping" : "list")));
  }
}

template <class T> T YamlSection::required(const std::string& key) {
  if (!has(key)) fail(key, "required field is missing");
  return get<T>(key, T{});
}

}  // namespace moerl
