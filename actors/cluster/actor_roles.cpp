#include "actors/cluster/actor_roles.hpp"

#include <nlohmann/json.hpp>

#include "actors/roles/data_loader.hpp"
#include "actors/roles/stage_trainer.hpp"
#include "runtime/error.hpp"
#include "runtime/recipe/recipe.hpp"

namespace moerl::cluster {
namespace fs = std::filesystem;
using Json = nlohmann::json;

namespace {

// The recipe as the driver loaded it: same file, overrides and run folder.
Recipe recipe_of(const RoleSpec& spec, const Json& j) {
  try {
    Recipe r = load_recipe(j.at("recipe").get<std::string>(), j.value("overrides", std::vector<std::string>{}));
    r.out = j.at("out").get<std::string>();
    return r;
  } catch (const Json::exception& e) {
    throw Error("role " + spec.name + " config: " + e.what() + " (expected recipe, overrides, out)");
  }
}

std::vector<std::string> pinned_overrides(const fs::path& recipe, std::vector<std::string> overrides) {
  // The recipe's data paths are relative to the driver's working folder: pin them for the node.
  const Recipe r = load_recipe(recipe, overrides);
  if (r.data.dir.is_relative()) overrides.push_back("data.dir=" + fs::absolute(r.data.dir).string());
  if (r.data.corpus != "brown" && fs::path(r.data.corpus).is_relative())
    overrides.push_back("data.corpus=" + fs::absolute(r.data.corpus).string());
  return overrides;
}

}  // namespace

void add_actor_roles(RoleCatalog& catalog) {
  catalog.add("roles.data_loader", [](caf::actor_system& system, const RoleSpec& spec) {
    const Json j = role_config_json(spec);
    return caf::actor_cast<caf::actor>(actors::spawn_data_loader(system, recipe_of(spec, j), spec.name));
  });
  catalog.add("roles.stage_trainer", [](caf::actor_system& system, const RoleSpec& spec) {
    const Json j = role_config_json(spec);
    actors::StageTrainerSetup setup;
    setup.recipe = recipe_of(spec, j);
    setup.model = setup.recipe.model;
    try {
      setup.model.vocab_size = j.at("vocab_size").get<int64_t>();
      setup.model.bos_token_id = j.at("bos_id").get<int64_t>();
      setup.model.eos_token_id = j.at("eos_id").get<int64_t>();
      setup.tokenizer_file = j.at("tokenizer_file").get<std::string>();
    } catch (const Json::exception& e) {
      throw Error("role " + spec.name + " config: " + e.what() + " (expected vocab_size, bos_id, eos_id, tokenizer_file)");
    }
    return caf::actor_cast<caf::actor>(actors::spawn_stage_trainer(system, std::move(setup), spec.name));
  });
}

std::string data_loader_config(const fs::path& recipe, const std::vector<std::string>& overrides, const fs::path& out) {
  return Json{{"recipe", fs::absolute(recipe).string()},
              {"overrides", pinned_overrides(recipe, overrides)},
              {"out", fs::absolute(out).string()}}
      .dump();
}

std::string stage_trainer_config(const fs::path& recipe, const std::vector<std::string>& overrides, const fs::path& out,
                                 const msg::DatasetInfo& data) {
  Json j = Json::parse(data_loader_config(recipe, overrides, out));
  j["vocab_size"] = data.vocab_size;
  j["bos_id"] = data.bos_id;
  j["eos_id"] = data.eos_id;
  j["tokenizer_file"] = fs::absolute(data.tokenizer_file).string();
  return j.dump();
}

}  // namespace moerl::cluster
