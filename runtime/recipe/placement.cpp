#include "runtime/recipe/placement.hpp"

#include "runtime/error.hpp"
#include "runtime/recipe/yaml_section.hpp"

namespace moerl {
namespace {

// Node names: [A-Za-z0-9._-]; role names may also hold '/' ("stage_trainer/0").
bool valid_name(const std::string& name, bool role = false) {
  if (name.empty() || name.size() > 64) return false;
  for (char c : name)
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
          c == '-' || (role && c == '/')))
      return false;
  return true;
}

void add_entry(Placement& p, const std::string& role, const std::string& node, const std::string& where) {
  require(role == "*" || valid_name(role, true),
          where + ": role name \"" + role + "\": expected [A-Za-z0-9._/-] or \"*\"");
  require(valid_name(node), where + ": node name \"" + node + "\": expected [A-Za-z0-9._-], 1..64 characters");
  require(!p.roles.count(role), where + ": role \"" + role + "\" is placed twice");
  p.roles[role] = node;
}

}  // namespace

std::string Placement::node_for(const std::string& role) const {
  auto it = roles.find(role);
  if (it == roles.end()) it = roles.find("*");
  if (it == roles.end() || it->second == "any") return "";
  return it->second;
}

Placement read_placement(const YAML::Node& node, const std::string& file) {
  Placement p;
  if (!node || node.IsNull()) return p;
  const std::string at = file + ":" + std::to_string(node.Mark().line + 1) + ": placement";
  require(node.IsMap(), at + ": expected a mapping of role: node");
  for (const auto& kv : node) {
    const std::string where = file + ":" + std::to_string(kv.first.Mark().line + 1) + ": placement." +
                              (kv.first.IsScalar() ? kv.first.Scalar() : "?");
    require(kv.first.IsScalar() && kv.second.IsScalar(), where + ": expected role: node (two names)");
    add_entry(p, kv.first.Scalar(), kv.second.Scalar(), where);
  }
  return p;
}

Placement read_placement(YamlSection& recipe) {
  const YAML::Node node = recipe.raw("placement");
  return read_placement(node, recipe.where("placement").substr(0, recipe.where("placement").find(':')));
}

Placement load_placement(const std::filesystem::path& recipe_file) {
  const std::string name = recipe_file.string();
  require(std::filesystem::is_regular_file(recipe_file), name + ": recipe file not found");
  YAML::Node root;
  try {
    root = YAML::LoadFile(name);
  } catch (const YAML::Exception& e) {
    throw Error(name + ":" + std::to_string(e.mark.line + 1) + ": not valid YAML: " + e.msg);
  }
  if (!root.IsMap()) return {};
  return read_placement(root["placement"], name);
}

Placement parse_placement(const std::vector<std::string>& entries) {
  Placement p;
  for (const std::string& e : entries) {
    const size_t eq = e.find('=');
    require(eq != std::string::npos, "--placement " + e + ": expected role=node, e.g. trainer=node-b");
    add_entry(p, e.substr(0, eq), e.substr(eq + 1), "--placement " + e);
  }
  return p;
}

Placement merge_placement(Placement base, const Placement& over) {
  for (const auto& [role, node] : over.roles) base.roles[role] = node;
  return base;
}

}  // namespace moerl
