// The training roles: the data loader serves and resumes, the stage trainer applies each step id once, the
// driver's run equals run_recipe's bit for bit (and resumes like it), a killed stage trainer or loader is
// restarted from the last checkpoint with every step logged once, and one that keeps dying stops the run.
#include <functional>
#include <map>
#include <thread>

#include "actors/roles/data_loader.hpp"
#include "actors/roles/driver.hpp"
#include "actors/roles/stage_trainer.hpp"
#include "runtime/recipe/recipe.hpp"
#include "runtime/train/run_recipe.hpp"
#include "tests/actors/driver_support.hpp"

namespace moerl::actors {
namespace {

using namespace moerl::actors::testing;

TEST(DataLoader, ServesBatchesByStepAndResumesAtItsPosition) {
  const fs::path dir = fresh_dir("loader");
  const RemoveAtExit cleanup{dir};
  const Recipe recipe = load_recipe(write_recipe(dir, 12));
  caf::actor_system system{test_config()};
  caf::scoped_actor self{system};
  auto loader = spawn_data_loader(system, recipe);
  const auto info = ask<Envelope>(self, loader, nullptr, describe_atom::value);
  ASSERT_TRUE(info);
  EXPECT_EQ(unwrap<msg::DatasetInfo>(*info).vocab_size, 300u);
  const auto opened = ask<Envelope>(self, loader, nullptr, open_atom::value, uint32_t{0});
  ASSERT_TRUE(opened);
  const auto data = unwrap<msg::StageData>(*opened);
  EXPECT_EQ(data.validation.size(), 2u);
  EXPECT_TRUE(data.has_bigram);
  auto batch = [&](uint64_t step, caf::error* err = nullptr) {
    const auto e = ask<Envelope>(self, loader, err, batch_atom::value, step);
    return e ? std::optional(unwrap<msg::TokenBatch>(*e)) : std::nullopt;
  };
  const auto b1 = batch(1), b2 = batch(2), b2_again = batch(2);
  ASSERT_TRUE(b1 && b2 && b2_again);
  EXPECT_EQ(*b2, *b2_again) << "a repeated step gets the same batch";
  EXPECT_NE(b1->ids, b2->ids);
  EXPECT_EQ(b2->step, (msg::StepId{"tiny/pretrain", 2}));
  caf::error err;
  EXPECT_FALSE(batch(4, &err));
  EXPECT_NE(error_text(err).find("data_loader/0: batch for step 4"), std::string::npos) << describe(err);
  const auto position = ask<Envelope>(self, loader, nullptr, position_atom::value);
  ASSERT_TRUE(position);
  const auto b3 = batch(3);
  // A second loader restored to the recorded position serves the third batch.
  auto other = spawn_data_loader(system, recipe, "data_loader/1");
  ask<Envelope>(self, other, nullptr, open_atom::value, uint32_t{0});
  const auto restored = ask<Envelope>(self, other, nullptr, restore_atom::value, *position);
  ASSERT_TRUE(restored);
  EXPECT_EQ(unwrap<msg::LoaderPosition>(*restored).step.step, 2u);
  const auto e3 = ask<Envelope>(self, other, nullptr, batch_atom::value, uint64_t{3});
  ASSERT_TRUE(e3 && b3);
  EXPECT_EQ(unwrap<msg::TokenBatch>(*e3), *b3);
}

TEST(StageTrainer, AnswersARepeatedStepWithItsRecordedResultWithoutTrainingAgain) {
  const fs::path dir = fresh_dir("trainer");
  const RemoveAtExit cleanup{dir};
  const Recipe recipe = load_recipe(write_recipe(dir, 12));
  caf::actor_system system{test_config()};
  caf::scoped_actor self{system};
  auto loader = spawn_data_loader(system, recipe);
  const auto info = unwrap<msg::DatasetInfo>(*ask<Envelope>(self, loader, nullptr, describe_atom::value));
  const auto data = unwrap<msg::StageData>(*ask<Envelope>(self, loader, nullptr, open_atom::value, uint32_t{0}));
  ModelConfig config = recipe.model;
  config.vocab_size = info.vocab_size;
  config.bos_token_id = info.bos_id;
  config.eos_token_id = info.eos_id;
  auto trainer = spawn_stage_trainer(system, StageTrainerSetup{recipe, config, info.tokenizer_file, {}});
  EXPECT_EQ(ask<uint64_t>(self, trainer, nullptr, begin_atom::value, uint32_t{0}, std::string(), false), 0u);

  auto step_cmd = [&](uint64_t step) {
    auto b = unwrap<msg::TokenBatch>(*ask<Envelope>(self, loader, nullptr, batch_atom::value, step));
    return msg::TrainStep{b.step, {b}, learning_rate(recipe.stages[0].optimizer, static_cast<int64_t>(step) - 1)};
  };
  auto evaluate = [&] {
    msg::EvalRequest req;
    req.step = msg::StepId{"tiny/pretrain", 1};
    req.batches = data.validation;
    return unwrap<msg::EvalResult>(*ask<Envelope>(self, trainer, nullptr, evaluate_atom::value, wrap(req))).loss;
  };
  const msg::TrainStep s1 = step_cmd(1);
  const auto r1 = ask<Envelope>(self, trainer, nullptr, train_atom::value, wrap(s1));
  ASSERT_TRUE(r1);
  const double val_after_1 = evaluate();
  const auto r1_again = ask<Envelope>(self, trainer, nullptr, train_atom::value, wrap(s1));
  ASSERT_TRUE(r1_again);
  EXPECT_EQ(unwrap<msg::TrainStepResult>(*r1_again), unwrap<msg::TrainStepResult>(*r1));
  EXPECT_EQ(evaluate(), val_after_1) << "the repeated step changed the weights";

  caf::error err;
  const msg::TrainStep s2 = step_cmd(2);
  msg::TrainStep s2_bad_rate = s2;
  s2_bad_rate.learning_rate *= 2;
  EXPECT_FALSE(ask<Envelope>(self, trainer, &err, train_atom::value, wrap(s2_bad_rate)));
  EXPECT_NE(error_text(err).find("TrainStep.learningRate"), std::string::npos) << describe(err);
  msg::TrainStep s3 = step_cmd(3);
  EXPECT_FALSE(ask<Envelope>(self, trainer, &err, train_atom::value, wrap(s3)));
  EXPECT_NE(error_text(err).find("expected 2"), std::string::npos) << describe(err);
  // Malformed bytes: random, and a valid command cut short.
  std::vector<uint8_t> bytes = wrap(s1).bytes;
  bytes.resize(bytes.size() / 2 / 8 * 8);
  EXPECT_FALSE(ask<Envelope>(self, trainer, &err, train_atom::value, Envelope{"TrainStep", bytes}));
  EXPECT_NE(error_text(err).find("stage_trainer/0: TrainStep"), std::string::npos) << describe(err);
  EXPECT_FALSE(ask<Envelope>(self, trainer, &err, evaluate_atom::value, Envelope{"EvalRequest", {1, 2, 3}}));
  EXPECT_NE(error_text(err).find("EvalRequest: 3 bytes"), std::string::npos) << describe(err);
  // Still serving: step 2 with the right rate.
  const auto r2 = ask<Envelope>(self, trainer, nullptr, train_atom::value, wrap(s2));
  ASSERT_TRUE(r2);
  EXPECT_EQ(unwrap<msg::TrainStepResult>(*r2).step.step, 2u);

  // A checkpoint of the last applied step, listed with sizes and CRC-32C; of any other step, refused.
  const fs::path folder = dir / "run" / "pretrain";
  auto checkpoint_at = [&](uint64_t step) {  // field by field: GCC 12 misreads nested braces (-Wmaybe-uninitialized)
    msg::CheckpointRequest req;
    req.folder = folder.string();
    req.step.run = "tiny/pretrain";
    req.step.step = step;
    req.trainer_state = nlohmann::json{{"stage", "pretrain"}, {"step", step}}.dump();
    return wrap(req);
  };
  EXPECT_FALSE(ask<Envelope>(self, trainer, &err, checkpoint_atom::value, checkpoint_at(3)));
  EXPECT_NE(error_text(err).find("expected the last applied step 2"), std::string::npos) << describe(err);
  const auto manifest = ask<Envelope>(self, trainer, nullptr, checkpoint_atom::value, checkpoint_at(2));
  ASSERT_TRUE(manifest);
  const auto m = unwrap<msg::CheckpointManifest>(*manifest);
  std::vector<std::string> names;
  for (const msg::FileEntry& f : m.files) {
    names.push_back(f.path);
    EXPECT_EQ(f.bytes, fs::file_size(folder / f.path)) << f.path;
    // CRC-32C bit by bit (the reflected Castagnoli polynomial), big-endian as the schema says.
    std::ifstream in(folder / f.path, std::ios::binary);
    uint32_t crc = 0xFFFFFFFFu;
    for (char c; in.get(c);) {
      crc ^= static_cast<uint8_t>(c);
      for (int k = 0; k < 8; ++k) crc = (crc & 1) ? (crc >> 1) ^ 0x82F63B78u : crc >> 1;
    }
    crc ^= 0xFFFFFFFFu;
    EXPECT_EQ(f.checksum, (std::vector<uint8_t>{static_cast<uint8_t>(crc >> 24), static_cast<uint8_t>(crc >> 16),
                                                static_cast<uint8_t>(crc >> 8), static_cast<uint8_t>(crc)}))
        << f.path;
  }
  EXPECT_EQ(names, (std::vector<std::string>{"config.json", "model.safetensors", "optimizer.safetensors",
                                             "tokenizer.model", "trainer_state.json"}));
}

TEST(Driver, RunsARecipeWithTheDirectPathsLossesBitForBitAndRestartsAKilledTrainerFromItsCheckpoint) {
  const fs::path dir = fresh_dir("driver");
  const RemoveAtExit cleanup{dir};
  const fs::path file = write_recipe(dir, 12, 5);
  Recipe direct = load_recipe(file);
  direct.out = dir / "direct";
  const auto direct_summary = run_recipe(direct);
  const auto actors = run_recipe_with_actors(file, {}, (dir / "actors").string());
  EXPECT_EQ(actors.out, dir / "actors");
  // The trainer killed after the step-4 checkpoint: the driver restarts it there and the run goes on.
  const fs::path resumed = dir / "resumed";
  int kills = 0;
  const std::string failure = run_and_kill(
      file, {}, resumed, "stage_trainer/0", 1, [&] { return fs::exists(resumed / "pretrain" / "trainer_state.json"); },
      &kills);
  EXPECT_EQ(kills, 1) << "the run ended before the kill";
  EXPECT_EQ(failure, "");

  const auto want = step_metrics(dir / "direct" / "metrics.jsonl");
  ASSERT_EQ(want.size(), 17u);  // 12 pretraining + 5 SFT steps
  const auto got_actors = step_metrics(dir / "actors" / "metrics.jsonl");
  ASSERT_EQ(got_actors.size(), want.size());
  const auto got_resumed = step_metrics(resumed / "metrics.jsonl");
  ASSERT_EQ(got_resumed.size(), want.size()) << "a step repeated after the restart was logged twice";
  for (size_t i = 0; i < want.size(); ++i) {
    for (const auto* got : {&got_actors[i], &got_resumed[i]}) {
      SCOPED_TRACE((got == &got_actors[i] ? "actors " : "restarted ") + want[i]["stage"].get<std::string>() +
                   " step " + std::to_string(want[i]["step"].get<int64_t>()));
      EXPECT_EQ((*got)["stage"], want[i]["stage"]);
      EXPECT_EQ((*got)["step"], want[i]["step"]);
      for (const char* k : {"loss", "mtp_loss", "balance_loss", "grad_norm", "lr", "tokens", "expert_max_load_ratio",
                            "validation_loss"})
        EXPECT_EQ(got->value(k, -1.0), want[i].value(k, -1.0)) << k;
    }
  }
  for (size_t s = 0; s < 2; ++s) {
    const auto& a = direct_summary["stages"][s];
    const auto& b = actors.summary["stages"][s];
    EXPECT_EQ(a["validation_loss"], b["validation_loss"]);
    EXPECT_EQ(a["train_loss"], b["train_loss"]);
    EXPECT_EQ(a.value("bigram_validation_loss", -1.0), b.value("bigram_validation_loss", -1.0));
  }
}

TEST(Driver, RestartsAKilledLoaderAndEndsWithTheUndisturbedLosses) {
  const fs::path dir = fresh_dir("kill-loader");
  const RemoveAtExit cleanup{dir};
  const fs::path file = write_recipe(dir, 10, 0, 3);
  run_recipe_with_actors(file, {}, (dir / "calm").string());
  int kills = 0;
  const fs::path out = dir / "run";
  const std::string failure =
      run_and_kill(file, {}, out, "data_loader/0", 1, [&] { return step_metrics(out / "metrics.jsonl").size() >= 4; },
                   &kills);
  EXPECT_EQ(kills, 1) << "the run ended before the kill";
  EXPECT_EQ(failure, "");
  const auto want = step_metrics(dir / "calm" / "metrics.jsonl");
  const auto got = step_metrics(out / "metrics.jsonl");
  ASSERT_EQ(got.size(), want.size()) << "every step logged once";
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(got[i]["step"], want[i]["step"]);
    EXPECT_EQ(got[i]["loss"], want[i]["loss"]) << "step " << i + 1;
  }
}

TEST(Driver, StopsTheRunNamingTheChildWhenItKeepsDying) {
  const fs::path dir = fresh_dir("kill");
  const RemoveAtExit cleanup{dir};
  const fs::path file = write_recipe(dir, 5000, 0, 1000);
  int kills = 0;
  const std::string failure = run_and_kill(
      file, {}, dir / "run", "stage_trainer/0", 4, [&] { return !step_metrics(dir / "run" / "metrics.jsonl").empty(); },
      &kills);
  EXPECT_EQ(kills, 4);
  EXPECT_NE(failure.find("stage_trainer/0 died"), std::string::npos) << failure;
  EXPECT_NE(failure.find("restarted 3 times"), std::string::npos) << failure;
  EXPECT_FALSE(fs::exists(dir / "run" / "summary.json"));
}

TEST(Driver, AnswersABadRecipeWithTheFileLineAndField) {
  const fs::path dir = fresh_dir("bad-recipe");
  const RemoveAtExit cleanup{dir};
  const fs::path file = write_recipe(dir, 10);
  try {
    run_recipe_with_actors(file, {"stages.0.batch=0"});
    ADD_FAILURE() << "the run started";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("recipe.yaml"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("batch"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moerl::actors
