// Placement: which node of a cluster runs which role of a run. In a recipe it is a `placement:` mapping of
// role name to node name (a node's --name; "head" is the head process itself; "any" lets the supervisor
// choose), with "*" as the default for roles not listed:
//
//   placement:
//     loader: node-a
//     trainer: node-b
//     "*": any
//
// A role whose node has died is restarted on another live node (actors/cluster/supervisor.hpp), so
// placement is where roles start, not a constraint that can stop a run.
#pragma once
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include <yaml-cpp/yaml.h>

namespace moerl {

class YamlSection;

struct Placement {
  std::map<std::string, std::string> roles;  // role name -> node name ("any": no preference)

  // The node for `role`: its entry, else the "*" entry, else "" (any node); "any" also gives "".
  std::string node_for(const std::string& role) const;
  bool empty() const { return roles.empty(); }
};

// The `placement:` mapping of a recipe (marks the key used; an empty placement when absent). Errors name
// file:line: placement.<role>.
Placement read_placement(YamlSection& recipe);
Placement read_placement(const YAML::Node& node, const std::string& file);

// The `placement:` section of a recipe file, read on its own (an empty placement when it has none).
Placement load_placement(const std::filesystem::path& recipe_file);

// "role=node" entries (the --placement flag), e.g. {"trainer=node-b"}; errors name the entry.
Placement parse_placement(const std::vector<std::string>& entries);

// `over` entries replace those of `base`.
Placement merge_placement(Placement base, const Placement& over);

}  // namespace moerl
