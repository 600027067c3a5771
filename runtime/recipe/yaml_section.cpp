#include "runtime/recipe/yaml_section.hpp"

namespace moerl {
namespace {

// "FILE:LINE", or "FILE (--set)" for a node that no line of the file holds (made by a --set override).
std::string file_at(const std::string& file, const YAML::Mark& mark) {
  return mark.line >= 0 ? file + ":" + std::to_string(mark.line + 1) : file + " (--set)";
}

}  // namespace

YamlSection::YamlSection(YAML::Node node, std::string file, std::string path)
    : node_(std::move(node)), file_(std::move(file)), path_(std::move(path)) {
  if (node_ && !node_.IsNull() && !node_.IsMap())
    throw Error(file_at(file_, node_.Mark()) + ": " + (path_.empty() ? "recipe" : path_) +
                ": expected a mapping of fields");
}

bool YamlSection::has(const std::string& key) const {
  return node_ && node_.IsMap() && node_[key] && !node_[key].IsNull();
}

YAML::Node YamlSection::raw(const std::string& key) {
  used_.insert(key);
  return has(key) ? node_[key] : YAML::Node();
}

YamlSection YamlSection::section(const std::string& key) {
  used_.insert(key);
  return YamlSection(has(key) ? node_[key] : YAML::Node(), file_, child_path(key));
}

std::vector<YamlSection> YamlSection::list(const std::string& key) {
  used_.insert(key);
  std::vector<YamlSection> out;
  if (!has(key)) return out;
  const YAML::Node seq = node_[key];
  if (!seq.IsSequence()) fail(key, "expected a list");
  for (size_t i = 0; i < seq.size(); ++i)
    out.emplace_back(seq[i], file_, child_path(key) + "[" + std::to_string(i) + "]");
  return out;
}

std::string YamlSection::where(const std::string& key) const {
  if (has(key)) return file_at(file_, node_[key].Mark()) + ": " + child_path(key);
  if (node_) return file_at(file_, node_.Mark()) + ": " + child_path(key);
  return file_ + ": " + child_path(key);
}

void YamlSection::fail(const std::string& key, const std::string& what) const {
  throw Error(where(key) + ": " + what);
}

void YamlSection::refuse_unknown() const {
  if (!node_ || !node_.IsMap()) return;
  for (const auto& kv : node_) {
    const std::string key = kv.first.as<std::string>();
    if (!used_.count(key)) {
      std::string known;
      for (const auto& k : used_) known += (known.empty() ? "" : ", ") + k;
      throw Error(file_at(file_, kv.first.Mark()) + ": " + child_path(key) + ": unknown field (known here: " + known +
                  ")");
    }
  }
}

}  // namespace moerl
