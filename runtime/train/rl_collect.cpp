#include "runtime/safetensors.hpp"
#include "runtime/util/clock.hpp"
#include "runtime/train/rl_collect.hpp"

#include <algorithm>
#include <chrono>
#include <fstream>
#include <random>
#include <thread>
#include <tuple>

#include "runtime/error.hpp"
#include "runtime/feedback/http_server.hpp"
#include "runtime/feedback/service.hpp"
#include "runtime/messages/codec.hpp"
#include "runtime/rl/annotator.hpp"
#include "runtime/rl/generate.hpp"
#include "runtime/store/durable_store.hpp"
#include "runtime/store/pair_record.hpp"
#include "runtime/train/checkpoint.hpp"
#include "runtime/util/files.hpp"
#include "runtime/util/progress.hpp"

namespace moerl {
namespace fs = std::filesystem;
SafeTensors weights_of(const Model& model) {
  SafeTensors st;
  st.source = "the policy of the previous stage";
  for (const auto& [name, p] : model.params().all()) st.tensors.emplace(name, p.value.clone());
  return st;
}

// The starting policy: `from`'s checkpoint, or the model in memory (the stage before).
void start_policy(const Recipe& recipe, const StageSpec& stage, Model& policy) {
  if (stage.rl.from.empty()) return;
  const auto st = read_safetensors(recipe.out / stage.rl.from / "model.safetensors");
  policy.load_weights(st);
}

rl::TaskCodec tokenizer_codec(const Tokenizer& tokenizer) {
  rl::TaskCodec codec;
  codec.prompt_ids = [&tokenizer](const rl::Problem& p) {
    auto ids = tokenizer.encode(p.prompt);
    ids.insert(ids.begin(), tokenizer.bos_id());
    return ids;
  };
  codec.answer_ids = [&tokenizer](const rl::Problem& p) { return tokenizer.encode(p.answer); };
  codec.check = [&tokenizer](const rl::Problem& p, std::span<const int32_t> response) {
    return response_text(tokenizer, response) == p.answer;
  };
  codec.eos_id = tokenizer.eos_id();
  codec.pad_id = tokenizer.pad_id();
  return codec;
}

std::string response_text(const Tokenizer& tokenizer, std::span<const int32_t> ids) {
  const auto eos = std::find(ids.begin(), ids.end(), tokenizer.eos_id());
  return tokenizer.decode(ids.subspan(0, static_cast<size_t>(eos - ids.begin())));
}

std::string judged_text(const Tokenizer& tokenizer, std::span<const int32_t> ids) {
  std::string text = response_text(tokenizer, ids);
  return text.empty() ? std::string(kEmptyResponse) : text;
}

rl::Problem parse_task_prompt(const rl::AdditionTask& task, const std::string& prompt) {
  const auto plus = prompt.find('+');
  const bool shape = plus != std::string::npos && prompt.size() > plus + 2 && prompt.back() == '=' &&
                     std::all_of(prompt.begin(), prompt.end() - 1, [](char c) { return std::isdigit(c) || c == '+'; });
  require(shape, "task prompt \"" + prompt.substr(0, 64) + "\": expected \"A+B=\" with decimal A and B");
  const rl::Problem p =
      rl::make_problem(task, std::stoll(prompt.substr(0, plus)), std::stoll(prompt.substr(plus + 1)));
  require(p.prompt == prompt, "task prompt \"" + prompt + "\" is not one of the " + std::to_string(task.digits) +
                                  "-digit task's (expected e.g. \"" + p.prompt + "\")");
  return p;
}

nlohmann::json run_task_sft(const Recipe& recipe, const StageSpec& stage, Model& policy, const Tokenizer& tokenizer,
                            MetricsLog& metrics, const fs::path& dir) {
  const auto t0 = std::chrono::steady_clock::now();
  start_policy(recipe, stage, policy);
  const rl::AdditionTask task{stage.rl.task_digits};
  const rl::TaskCodec codec = tokenizer_codec(tokenizer);
  const auto problems = rl::training_problems(task, recipe.seed + 211, static_cast<size_t>(stage.steps * stage.batch));
  // Validation: the first held-out problems (those eval_task asks too; never trained on).
  const auto held = rl::evaluation_problems(task, 64);
  AdamWConfig oc = stage.optimizer;
  oc.total_steps = stage.steps;
  AdamW opt(policy.params(), oc);
  ProgressBar bar(stage.name, stage.steps, "ex");
  double loss = 0, validation = 0;
  for (int64_t step = 0; step < stage.steps; ++step) {
    const std::span<const rl::Problem> batch(problems.data() + step * stage.batch, static_cast<size_t>(stage.batch));
    loss = rl::sft_step(policy, opt, batch, step, recipe.precision, codec);
    if (stage.bias_gamma > 0) policy.update_router_bias(stage.bias_gamma);
    nlohmann::json m = {{"stage", stage.name}, {"step", step + 1}, {"loss", loss}};
    if ((step + 1) % stage.eval_every == 0 || step + 1 == stage.steps) {
      validation = rl::sft_loss(policy, held, recipe.precision, codec);
      m["validation_loss"] = validation;
    }
    metrics.write(m);
    char fields[96];
    std::snprintf(fields, sizeof fields, "loss %.3f  val %.3f", loss, validation);
    bar.update(step + 1, (step + 1) * stage.batch, fields);
  }
  char fields[96];
  std::snprintf(fields, sizeof fields, "loss %.3f  validation %.3f", loss, validation);
  bar.finish(fields);
  save_checkpoint(dir, policy, &tokenizer, nullptr, nullptr);
  return {{"stage", stage.name},       {"kind", stage.kind},     {"steps", stage.steps},
          {"train_loss", loss},        {"validation_loss", validation}, {"wall_s", seconds_since(t0)},
          {"checkpoint", dir.string()}};
}

// run_preferences: runtime/train/preferences_stage.cpp.

void read_judged_pairs(const Recipe& recipe, const StageSpec& stage, std::vector<PreferencePair>& train,
                       std::vector<PreferencePair>& held) {
  const rl::AdditionTask task{stage.rl.task_digits};
  const fs::path db = recipe.out / stage.name / "feedback";
  require(fs::exists(db), "preferences of stage " + stage.name + ": no feedback store at " + db.string());
  std::vector<PreferencePair> pairs;
  {
    store::DurableStore store(db.string());
    store.scan(store::Family::Comparison, 0, UINT64_MAX, [&](const store::Key&, std::span<const uint8_t> bytes) {
      const msg::Comparison c = msg::decode_comparison(bytes);
      if (c.choice == msg::Choice::FirstChosen) pairs.push_back({c.prompt.text, c.first.text, c.second.text});
      if (c.choice == msg::Choice::SecondChosen) pairs.push_back({c.prompt.text, c.second.text, c.first.text});
      return true;
    });
  }
  std::sort(pairs.begin(), pairs.end(), [](const PreferencePair& a, const PreferencePair& b) {
    return std::tie(a.prompt, a.chosen, a.rejected) < std::tie(b.prompt, b.chosen, b.rejected);
  });
  for (auto& p : pairs) {
    const rl::Problem q = parse_task_prompt(task, p.prompt);
    (rl::is_held_out(task, q.a, q.b) ? held : train).push_back(std::move(p));
  }
}

}  // namespace moerl
