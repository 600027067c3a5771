// Recipes are checked when read: every error names the file, the line and the field.
#include "runtime/recipe/recipe.hpp"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "runtime/error.hpp"

namespace moerl {
namespace {

namespace fs = std::filesystem;

fs::path write_recipe(const std::string& name, const std::string& text) {
  const fs::path dir = fs::temp_directory_path() / "moerl-recipe-test";
  fs::create_directories(dir);
  const fs::path file = dir / name;
  std::ofstream(file) << text;
  return file;
}

const char* kValid = R"(name: t
precision: fp8
model:
  hidden_size: 32
  num_hidden_layers: 2
stages:
  - name: pretrain
    kind: pretrain
    steps: 10
    optimizer:
      lr: 1.0e-3
)";

std::string error_of(const fs::path& file, const std::vector<std::string>& overrides = {}) {
  try {
    load_recipe(file, overrides);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Recipe, ReadsFieldsAndKeepsDefaultsForTheRest) {
  const Recipe r = load_recipe(write_recipe("ok.yaml", kValid));
  EXPECT_EQ(r.precision, Precision::FP8);
  EXPECT_EQ(r.model.hidden_size, 32);
  ASSERT_EQ(r.stages.size(), 1u);
  EXPECT_EQ(r.stages[0].steps, 10);
  EXPECT_DOUBLE_EQ(r.stages[0].optimizer.lr, 1e-3);
  EXPECT_EQ(r.stages[0].optimizer.total_steps, 10);
  EXPECT_EQ(r.stages[0].batch, StageSpec{}.batch);
}

TEST(Recipe, UnknownFieldIsRefusedWithFileLineAndPath) {
  std::string text = kValid;
  text.replace(text.find("    steps: 10"), 13, "    stepz: 10");
  const std::string e = error_of(write_recipe("typo.yaml", text));
  EXPECT_NE(e.find("typo.yaml:9: stages[0].stepz: unknown field"), std::string::npos) << e;
}

TEST(Recipe, WrongTypeNamesTheFieldAndWhatWasExpected) {
  std::string text = kValid;
  text.replace(text.find("hidden_size: 32"), 15, "hidden_size: big");
  const std::string e = error_of(write_recipe("type.yaml", text));
  EXPECT_NE(e.find("type.yaml:4: model.hidden_size: expected an integer, got \"big\""), std::string::npos) << e;
}

TEST(Recipe, UnknownPrecisionIsRefused) {
  const std::string e = error_of(write_recipe("p.yaml", kValid), {"precision=fp4"});
  EXPECT_NE(e.find("precision: expected fp32, bf16 or fp8; got \"fp4\""), std::string::npos) << e;
}

TEST(Recipe, OverridesApplyBeforeValidation) {
  const Recipe r = load_recipe(write_recipe("o.yaml", kValid), {"stages.0.steps=3", "model.hidden_size=48"});
  EXPECT_EQ(r.stages[0].steps, 3);
  EXPECT_EQ(r.model.hidden_size, 48);
}

TEST(Recipe, ErrorsAboutAnOverrideSayItCameFromSetNotALineOfTheFile) {
  const fs::path file = write_recipe("set.yaml", kValid);
  EXPECT_NE(error_of(file, {"stages.0.steps=abc"}).find("set.yaml (--set): stages[0].steps: expected an integer"),
            std::string::npos)
      << error_of(file, {"stages.0.steps=abc"});
  EXPECT_NE(error_of(file, {"model.hidden_sise=8"}).find("set.yaml (--set): model.hidden_sise: unknown field"),
            std::string::npos)
      << error_of(file, {"model.hidden_sise=8"});
}

TEST(Recipe, AStageLongerThanTheModelsPositionsIsRefused) {
  const std::string e = error_of(write_recipe("long.yaml", kValid), {"stages.0.seq=8192"});
  EXPECT_NE(e.find("stages[0].seq: 8192 tokens is longer than the model's positions (model.max_position_embeddings "),
            std::string::npos)
      << e;
  EXPECT_EQ(error_of(write_recipe("long.yaml", kValid), {"stages.0.seq=8192", "model.max_position_embeddings=8192"}),
            "");
}

TEST(Recipe, InconsistentModelShapeIsRefused) {
  const std::string e = error_of(write_recipe("m.yaml", kValid), {"model.topk_group=5", "model.n_group=2"});
  EXPECT_NE(e.find("topk_group"), std::string::npos) << e;
}

TEST(Recipe, AStageDataFileWhereTheStageReadsNoneIsRefused) {
  // A pretrain stage trains on the recipe's corpus: a data: file given to it would be silently ignored.
  std::string text = kValid;
  text.replace(text.find("    steps: 10"), 13, "    data: my-corpus.txt\n    steps: 10");
  const std::string e = error_of(write_recipe("pretrain-data.yaml", text));
  EXPECT_NE(e.find("pretrain-data.yaml:9: stages[0].data: a pretrain stage reads the recipe's corpus"),
            std::string::npos)
      << e;
}

TEST(Recipe, ASequenceLengthWhereTheStageSizesBatchesFromItsExamplesIsRefused) {
  // Only pretrain and sft cut sequences to seq:; elsewhere it would be silently ignored.
  std::string text = kValid;
  text += "  - name: prefs\n    kind: preferences\n    seq: 64\n";
  const std::string e = error_of(write_recipe("seq-prefs.yaml", text));
  EXPECT_NE(e.find("stages[1].seq: a preferences stage sizes each batch from its examples"), std::string::npos) << e;
  EXPECT_EQ(error_of(write_recipe("seq-pretrain.yaml", kValid), {"stages.0.seq=64"}), "");
}

TEST(Recipe, MissingFileAndBadYamlAreClearErrors) {
  EXPECT_NE(error_of("/nonexistent/recipe.yaml").find("recipe file not found"), std::string::npos);
  const std::string e = error_of(write_recipe("bad.yaml", "name: [unclosed\n"));
  EXPECT_NE(e.find("bad.yaml"), std::string::npos) << e;
  EXPECT_NE(e.find("not valid YAML"), std::string::npos) << e;
}

TEST(Recipe, ShippedRecipesAreValid) {
  for (const char* name : {"quickstart.yaml", "pretrain-brown.yaml"})
    EXPECT_NO_THROW(load_recipe(fs::path(MOERL_TEST_FIXTURES) / "../../recipes" / name)) << name;
}

}  // namespace
}  // namespace moerl
