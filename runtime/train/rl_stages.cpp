#include "runtime/util/clock.hpp"
#include "runtime/train/rl_stages.hpp"

#include <algorithm>
#include <chrono>
#include <fstream>
#include <random>
#include <set>

#include "runtime/error.hpp"
#include "runtime/rl/dpo.hpp"
#include "runtime/rl/generate.hpp"
#include "runtime/rl/preferences.hpp"
#include "runtime/rl/reward_model.hpp"
#include "runtime/rl/task.hpp"
#include "runtime/rl/task_loop.hpp"
#include "runtime/safetensors.hpp"
#include "runtime/train/checkpoint.hpp"
#include "runtime/train/rl_collect.hpp"
#include "runtime/train/rlhf_stage.hpp"
#include "runtime/util/files.hpp"
#include "runtime/util/progress.hpp"

namespace moerl {
namespace fs = std::filesystem;
namespace {

// Machine-judged pairs: for each problem, the exact answer against a corruption of it (one digit changed);
// rl::check_answer decides which is chosen. The fallback of a reward_model/dpo stage with neither data: nor an
// earlier preferences stage (whose pairs come from the policy through the feedback endpoint: rl_collect.hpp).
std::vector<PreferencePair> machine_judged_pairs(const rl::AdditionTask& task, std::span<const rl::Problem> problems,
                                                 uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<Candidates> candidates;
  for (const auto& p : problems) {
    const std::string wrong = corrupt_digits(p.answer, rng);
    candidates.push_back(rng() % 2 ? Candidates{p.prompt, p.answer, wrong} : Candidates{p.prompt, wrong, p.answer});
  }
  const AnswerChecker exact = [&task](const std::string& prompt, const std::string& response) {
    const auto plus = prompt.find('+');
    const rl::Problem p = rl::make_problem(task, std::stoll(prompt.substr(0, plus)),
                                           std::stoll(prompt.substr(plus + 1, prompt.size() - plus - 2)));
    return rl::check_answer(p, rl::task_encode(response));
  };
  // Distinct pairs only, first occurrence kept.
  std::vector<PreferencePair> unique;
  std::set<std::string> seen;
  for (auto& p : judge_by_checker(candidates, exact))
    if (seen.insert(p.prompt + '\n' + p.chosen + '\n' + p.rejected).second) unique.push_back(std::move(p));
  return unique;
}

struct PairSplit {
  std::vector<PreferencePair> train, held;
  std::string source;
};

// The stage's pairs. From its data file: every heldout_every-th pair held out. Machine-judged: training pairs
// from the task's training problems, held-out pairs from its held-out problems (prompts never trained on), both
// written to <out>/preferences/<stage>{,-heldout}.jsonl (beside the stage folder, which checkpoints replace).
// The preferences stage whose comparisons train `stage`: the one it names, else the last before it; null when none.
const StageSpec* preferences_stage(const Recipe& recipe, const StageSpec& stage) {
  const StageSpec* found = nullptr;
  for (const auto& b : recipe.stages) {
    if (b.name == stage.name) break;
    if (b.kind == "preferences" && (stage.rl.preferences.empty() || b.name == stage.rl.preferences)) found = &b;
  }
  require(stage.rl.preferences.empty() || found,
          stage.name + ": preferences: \"" + stage.rl.preferences + "\" is not an earlier stage of kind preferences");
  return found;
}

PairSplit stage_pairs(const Recipe& recipe, const StageSpec& stage) {
  PairSplit split;
  if (const StageSpec* prefs = stage.data.empty() ? preferences_stage(recipe, stage) : nullptr) {
    read_judged_pairs(recipe, *prefs, split.train, split.held);
    split.source = "comparisons judged through the feedback endpoint (stage " + prefs->name + ", store " +
                   (recipe.out / prefs->name / "feedback").string() + ")";
    return split;
  }
  if (!stage.data.empty()) {
    split.source = stage.data.string();
    auto pairs = read_preferences(stage.data);
    for (size_t i = 0; i < pairs.size(); ++i)
      (i % static_cast<size_t>(stage.rl.heldout_every) == 0 ? split.held : split.train).push_back(std::move(pairs[i]));
    return split;
  }
  const rl::AdditionTask task{stage.rl.task_digits};
  const size_t n_held = static_cast<size_t>(stage.rl.pairs / stage.rl.heldout_every);
  const uint64_t seed = recipe.seed + 7919;
  split.train = machine_judged_pairs(
      task, rl::training_problems(task, seed, static_cast<size_t>(stage.rl.pairs) - n_held), seed);
  split.held = machine_judged_pairs(task, rl::evaluation_problems(task, n_held), seed + 1);
  const fs::path dir = recipe.out / "preferences";
  write_preferences(dir / (stage.name + ".jsonl"), split.train);
  write_preferences(dir / (stage.name + "-heldout.jsonl"), split.held);
  split.source = "machine-judged task pairs (exact checker): " + (dir / (stage.name + ".jsonl")).string();
  return split;
}


nlohmann::json run_reward_model(const Recipe& recipe, const StageSpec& stage, Model& policy,
                                const Tokenizer& tokenizer, MetricsLog& metrics, const fs::path& dir) {
  const auto t0 = std::chrono::steady_clock::now();
  const PairSplit split = stage_pairs(recipe, stage);
  const std::string& source = split.source;
  const TextEncoder encode = [&tokenizer](std::string_view text) { return tokenizer.encode(text); };
  auto tokenize = [&](const std::vector<PreferencePair>& pairs) {
    std::vector<TokenPair> out;
    for (const auto& p : pairs) {
      ScoredTokens chosen = preference_tokens(encode, p.prompt, p.chosen, tokenizer.bos_id(), tokenizer.eos_id());
      ScoredTokens rejected = preference_tokens(encode, p.prompt, p.rejected, tokenizer.bos_id(), tokenizer.eos_id());
      out.push_back({std::move(chosen.ids), std::move(rejected.ids), chosen.response_start});
    }
    return out;
  };
  const std::vector<TokenPair> train = tokenize(split.train), held = tokenize(split.held);
  require(!train.empty() && !held.empty(), stage.name + ": " + std::to_string(train.size()) + " training and " +
                                               std::to_string(held.size()) + " held-out preference pairs from " +
                                               source + ": both must be non-empty");
  RewardModel rm(policy.config());
  rm.init_random(recipe.seed + 17);  // the head's start; the backbone comes from the policy
  if (stage.rl.from.empty()) {
    rm.load_weights(weights_of(policy));
  } else {
    rm.load_weights(read_safetensors(recipe.out / stage.rl.from / "model.safetensors"));
  }
  RewardTrainConfig cfg;
  cfg.steps = stage.steps;
  cfg.batch = stage.batch;
  cfg.optimizer = stage.optimizer;
  cfg.precision = recipe.precision;
  cfg.bias_gamma = stage.bias_gamma;
  cfg.seed = recipe.seed + 31;
  cfg.eval_every = stage.eval_every;
  ProgressBar bar(stage.name, stage.steps, "pair");
  const RewardTrainResult r = train_reward_model(rm, train, held, cfg, [&](int64_t step, const PairMetrics& m) {
    metrics.write({{"stage", stage.name}, {"step", step + 1}, {"loss", m.loss}, {"accuracy", m.accuracy},
                   {"margin", m.margin}});
    char fields[96];
    std::snprintf(fields, sizeof fields, "loss %.3f  acc %.2f", m.loss, m.accuracy);
    bar.update(step + 1, (step + 1) * stage.batch, fields);
  });
  for (const auto& [step, m] : r.heldout_curve)
    metrics.write({{"stage", stage.name}, {"step", step}, {"heldout_loss", m.loss}, {"heldout_accuracy", m.accuracy}});
  char fields[96];
  std::snprintf(fields, sizeof fields, "held-out accuracy %.3f", r.heldout.accuracy);
  bar.finish(fields);
  rm.save(dir);
  return {{"stage", stage.name},
          {"kind", stage.kind},
          {"steps", stage.steps},
          {"train_loss", r.train.loss},
          {"validation_loss", r.heldout.loss},
          {"rm_train_accuracy", r.train.accuracy},
          {"rm_heldout_accuracy", r.heldout.accuracy},
          {"rm_heldout_pairs", r.heldout.pairs},
          {"preferences", source},
          {"wall_s", seconds_since(t0)},
          {"checkpoint", dir.string()}};
}

nlohmann::json run_dpo(const Recipe& recipe, const StageSpec& stage, Model& policy, const Tokenizer& tokenizer,
                       MetricsLog& metrics, const fs::path& dir) {
  const auto t0 = std::chrono::steady_clock::now();
  start_policy(recipe, stage, policy);
  const PairSplit split = stage_pairs(recipe, stage);
  const std::string& source = split.source;
  auto tokenize = [&](const std::vector<PreferencePair>& pairs) {
    std::vector<rl::DpoPair> out;
    for (const auto& p : pairs) {
      auto prompt = tokenizer.encode(p.prompt);
      prompt.insert(prompt.begin(), tokenizer.bos_id());
      auto chosen = tokenizer.encode(p.chosen), rejected = tokenizer.encode(p.rejected);
      chosen.push_back(tokenizer.eos_id());
      rejected.push_back(tokenizer.eos_id());
      out.push_back({std::move(prompt), std::move(chosen), std::move(rejected)});
    }
    return out;
  };
  const std::vector<rl::DpoPair> train = tokenize(split.train), held = tokenize(split.held);
  require(!train.empty() && !held.empty(), stage.name + ": " + std::to_string(train.size()) + " training and " +
                                               std::to_string(held.size()) + " held-out preference pairs from " +
                                               source + ": both must be non-empty");
  Model reference(policy.config());
  reference.load_weights(weights_of(policy));
  rl::DpoConfig cfg;
  cfg.steps = stage.steps;
  cfg.batch = stage.batch;
  cfg.beta = stage.rl.beta;
  cfg.optimizer = stage.optimizer;
  cfg.precision = recipe.precision;
  cfg.bias_gamma = stage.bias_gamma;
  cfg.seed = recipe.seed + 37;
  ProgressBar bar(stage.name, stage.steps, "pair");
  const rl::DpoResult r = rl::train_dpo(policy, reference, train, held, cfg, [&](int64_t step, const rl::DpoMetrics& m) {
    metrics.write({{"stage", stage.name}, {"step", step + 1}, {"loss", m.loss}, {"accuracy", m.accuracy},
                   {"log_ratio_margin", m.log_ratio_margin}});
    char fields[96];
    std::snprintf(fields, sizeof fields, "loss %.3f  margin %.2f", m.loss, m.log_ratio_margin);
    bar.update(step + 1, (step + 1) * stage.batch, fields);
  });
  char fields[96];
  std::snprintf(fields, sizeof fields, "held-out margin %.3f", r.heldout_after.log_ratio_margin);
  bar.finish(fields);
  save_checkpoint(dir, policy, &tokenizer, nullptr, nullptr);
  return {{"stage", stage.name},
          {"kind", stage.kind},
          {"steps", stage.steps},
          {"train_loss", r.train_after.loss},
          {"validation_loss", r.heldout_after.loss},
          {"dpo_heldout_accuracy", r.heldout_after.accuracy},
          {"dpo_heldout_margin", r.heldout_after.log_ratio_margin},
          {"preferences", source},
          {"wall_s", seconds_since(t0)},
          {"checkpoint", dir.string()}};
}

// Exact-match accuracy of greedy answers to the task's held-out problems (never among training prompts): the
// prompt as text through the run's tokenizer, the answer decoded up to eos and compared with the exact sum.
nlohmann::json run_eval_task(const Recipe& recipe, const StageSpec& stage, Model& policy, const Tokenizer& tokenizer,
                             MetricsLog& metrics, const std::vector<StageSpec>& before) {
  const auto t0 = std::chrono::steady_clock::now();
  start_policy(recipe, stage, policy);
  const rl::AdditionTask task{stage.rl.task_digits};
  const auto problems = rl::evaluation_problems(task, static_cast<size_t>(stage.rl.problems));
  std::vector<std::vector<int32_t>> prompts;
  for (const auto& p : problems) {
    auto ids = tokenizer.encode(p.prompt);
    ids.insert(ids.begin(), tokenizer.bos_id());
    prompts.push_back(std::move(ids));
  }
  msg::SamplingParams greedy;
  greedy.temperature = 0.0f;
  greedy.max_new_tokens = static_cast<uint32_t>(stage.rl.max_new_tokens);
  greedy.stop_ids = {tokenizer.eos_id()};
  const std::vector<uint64_t> streams(problems.size(), 0);
  const auto out = rl::generate(policy, prompts, greedy, streams, recipe.precision);
  int64_t correct = 0;
  for (size_t i = 0; i < problems.size(); ++i) {
    std::vector<int32_t> ids = out[i].ids;
    const auto eos = std::find(ids.begin(), ids.end(), tokenizer.eos_id());
    ids.erase(eos, ids.end());
    correct += tokenizer.decode(ids) == problems[i].answer;
  }
  const double accuracy = problems.empty() ? 0.0 : static_cast<double>(correct) / static_cast<double>(problems.size());
  // Named after the last stage that trained the policy: task_accuracy_sft, task_accuracy_rlhf, ...
  std::string trained = "init";
  for (const auto& b : before)
    if (b.kind != "eval_task" && b.kind != "reward_model" && b.kind != "preferences") trained = b.kind;
  if (!stage.rl.from.empty())
    for (const auto& b : before)
      if (b.name == stage.rl.from) trained = b.kind;
  if (trained == "task_sft") trained = "sft";
  metrics.write({{"stage", stage.name}, {"step", 0}, {"task_accuracy", accuracy}});
  std::fprintf(stderr, "%-10s task accuracy %.3f (%lld / %zu held-out problems, policy after %s)\n",
               stage.name.c_str(), accuracy, static_cast<long long>(correct), problems.size(), trained.c_str());
  return {{"stage", stage.name},
          {"kind", stage.kind},
          {"steps", 0},
          {"task_accuracy", accuracy},
          {"problems", problems.size()},
          {"wall_s", seconds_since(t0)},
          {"top_level", {{"task_accuracy_" + trained, accuracy}}}};
}

}  // namespace

nlohmann::json run_rl_stage(const Recipe& recipe, const StageSpec& stage, Model& policy, const Tokenizer& tokenizer,
                            MetricsLog& metrics, const fs::path& dir) {
  require(is_rl_stage_kind(stage.kind), stage.name + ": not an RLHF stage kind (" + stage.kind + ")");
  const fs::path result = dir / "result.json";
  if (fs::exists(result)) {
    std::ifstream in(result);
    nlohmann::json done = nlohmann::json::parse(in);
    std::fprintf(stderr, "%-10s already complete in %s, skipped\n", stage.name.c_str(), dir.c_str());
    if (stage.kind == "dpo" || stage.kind == "rlhf" || stage.kind == "task_sft") policy.load_weights(read_safetensors(dir / "model.safetensors"));
    return done;
  }
  fs::create_directories(dir);
  nlohmann::json s;
  if (stage.kind == "task_sft") s = run_task_sft(recipe, stage, policy, tokenizer, metrics, dir);
  else if (stage.kind == "preferences") s = run_preferences(recipe, stage, policy, tokenizer, metrics, dir);
  else if (stage.kind == "reward_model") s = run_reward_model(recipe, stage, policy, tokenizer, metrics, dir);
  else if (stage.kind == "dpo") s = run_dpo(recipe, stage, policy, tokenizer, metrics, dir);
  else if (stage.kind == "eval_task") {
    std::vector<StageSpec> before;
    for (const auto& b : recipe.stages) {
      if (b.name == stage.name) break;
      before.push_back(b);
    }
    s = run_eval_task(recipe, stage, policy, tokenizer, metrics, before);
  } else {
    s = run_rlhf(recipe, stage, policy, tokenizer, metrics, dir);
  }
  write_file_durably(result, s.dump(2) + "\n");
  return s;
}

}  // namespace moerl
