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
namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// A bearer secret: 32 hex digits from the OS's entropy (the endpoint wants >= 16 printable characters).
std::string random_token() {
  std::random_device rd;
  std::string t;
  for (int i = 0; i < 32; ++i) t += "0123456789abcdef"[rd() % 16];
  return t;
}

}  // namespace

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

nlohmann::json run_preferences(const Recipe& recipe, const StageSpec& stage, Model& policy,
                               const Tokenizer& tokenizer, MetricsLog& metrics, const fs::path& dir) {
  const auto t0 = std::chrono::steady_clock::now();
  const rl::AdditionTask task{stage.rl.task_digits};
  const rl::TaskCodec codec = tokenizer_codec(tokenizer);
  // Prompts: 1/heldout_every of them the task's held-out problems (the reward model's held-out pairs).
  const size_t n_held = static_cast<size_t>(stage.rl.pairs / stage.rl.heldout_every);
  std::vector<rl::Problem> problems =
      rl::training_problems(task, recipe.seed + 307, static_cast<size_t>(stage.rl.pairs) - n_held);
  // (cycled when the task holds out fewer problems: each repeat draws new samples)
  const auto held_problems = rl::evaluation_problems(task, n_held);
  for (size_t i = 0; i < n_held && !held_problems.empty(); ++i) problems.push_back(held_problems[i % held_problems.size()]);

  // Two samples per prompt from the current policy (KV-cache generation at the stage's temperature).
  msg::SamplingParams sampling = rl::task_sampling(task, recipe.seed + 311, tokenizer.eos_id());
  sampling.temperature = static_cast<float>(stage.rl.temperature);
  sampling.max_new_tokens = static_cast<uint32_t>(stage.rl.max_new_tokens);
  std::vector<std::vector<int32_t>> prompts;
  std::vector<uint64_t> streams;
  for (size_t i = 0; i < problems.size(); ++i)
    for (uint64_t k = 0; k < 2; ++k) {
      prompts.push_back(codec.prompt_ids(problems[i]));
      streams.push_back(2 * i + k);
    }
  std::vector<rl::GeneratedSequence> gen;
  {
    ProgressBar bar(stage.name + " sample", static_cast<int64_t>(prompts.size()), "seq");
    const size_t chunk = 256;  // sequences per generate call: progress, and a bounded KV cache
    for (size_t b = 0; b < prompts.size(); b += chunk) {
      const size_t n = std::min(chunk, prompts.size() - b);
      auto part = rl::generate(policy, std::span(prompts).subspan(b, n), sampling, std::span(streams).subspan(b, n),
                               recipe.precision);
      for (auto& g : part) gen.push_back(std::move(g));
      bar.update(static_cast<int64_t>(b + n), static_cast<int64_t>(b + n), "");
    }
    bar.finish(std::to_string(gen.size()) + " responses");
  }
  int64_t correct = 0;
  for (size_t n = 0; n < gen.size(); ++n) correct += codec.check(problems[n / 2], gen[n].ids);

  // A fresh store under the stage's folder (a finished stage is skipped before this; a crashed one restarts).
  const fs::path db = dir / "feedback", tokens = dir / "tokens";
  fs::remove_all(db);
  const std::string admin = random_token(), annotator = random_token();
  write_file_durably(tokens, "# the feedback endpoint's bearer tokens of this run (moerl feedback serve --tokens)\n"
                             "admin admin " + admin + "\nannotator scripted " + annotator + "\n");
  fs::permissions(tokens, fs::perms::owner_read | fs::perms::owner_write);
  nlohmann::json summary;
  {
    store::DurableStore store(db.string());
    feedback::ServiceOptions options;
    options.rate_per_s = 0;  // one local annotator judging as fast as it can: no per-token limit
    feedback::FeedbackService service(store, feedback::read_tokens(tokens.string()), options);
    const msg::PolicyVersion version{0, 0};
    for (size_t n = 0; n < gen.size(); n += 2) {
      store::PairToJudge pair;
      pair.prompt = {problems[n / 2].prompt, prompts[n]};
      pair.first = {judged_text(tokenizer, gen[n].ids), gen[n].ids};
      pair.second = {judged_text(tokenizer, gen[n + 1].ids), gen[n + 1].ids};
      pair.first_policy = pair.second_policy = version;
      service.add_pair(std::move(pair));
    }
    feedback::HttpServer server(service, 4);
    const int port = server.bind("127.0.0.1", 0);
    std::thread serving([&server] { server.run(); });
    const std::string url = "http://127.0.0.1:" + std::to_string(port) + "/";
    std::fprintf(stderr, "%-10s feedback page %s  (tokens: %s; %zu pairs queued; judged by the %s annotator)\n",
                 stage.name.c_str(), url.c_str(), tokens.c_str(), gen.size() / 2, stage.rl.annotator.c_str());
    const int64_t queued = static_cast<int64_t>(gen.size() / 2);
    ProgressBar bar(stage.name + " judge", queued, "pair");
    rl::AnnotatorResult judged;
    try {
      if (stage.rl.annotator == "scripted") {
        rl::AnnotatorOptions o;
        o.port = port;
        o.token = annotator;
        // The exact checker judges: the right response is chosen; both right or both wrong is a tie.
        judged = rl::annotate_over_http(
            o,
            [&task](const std::string& prompt, const std::string& first, const std::string& second) {
              const rl::Problem p = parse_task_prompt(task, prompt);
              const bool a = first == p.answer, b = second == p.answer;
              return std::string(a == b ? "tie" : a ? "first" : "second");
            },
            [&](int64_t n) {
              if (n % 64 == 0) bar.update(n, n, "");
            });
      } else {  // people on the page: wait until every pair has a comparison
        while (static_cast<int64_t>(store.count(store::Family::Comparison)) < queued) {
          const auto n = static_cast<int64_t>(store.count(store::Family::Comparison));
          bar.update(n, n, "waiting for judgements on " + url);
          std::this_thread::sleep_for(std::chrono::seconds(2));
        }
        judged.judged = queued;
      }
    } catch (...) {
      server.stop();
      serving.join();
      throw;
    }
    server.stop();
    serving.join();
    bar.finish(std::to_string(judged.judged) + " judged, " + std::to_string(judged.ties) + " ties");
    summary = {{"url", url}, {"tokens", tokens.string()}, {"pairs_queued", queued}, {"pairs_judged", judged.judged},
               {"ties", judged.ties}, {"rate_limited", judged.rate_limited},
               {"comparisons_stored", store.count(store::Family::Comparison)}};
  }
  std::vector<PreferencePair> train, held;
  read_judged_pairs(recipe, stage, train, held);
  write_preferences(recipe.out / "preferences" / (stage.name + ".jsonl"), train);
  write_preferences(recipe.out / "preferences" / (stage.name + "-heldout.jsonl"), held);
  const double policy_accuracy = gen.empty() ? 0.0 : static_cast<double>(correct) / static_cast<double>(gen.size());
  metrics.write({{"stage", stage.name}, {"step", 0}, {"sampled_accuracy", policy_accuracy},
                 {"preference_pairs", train.size()}, {"heldout_preference_pairs", held.size()}});
  summary.update({{"stage", stage.name},
                  {"kind", stage.kind},
                  {"steps", 0},
                  {"annotator", stage.rl.annotator},
                  {"sampled_accuracy", policy_accuracy},
                  {"preference_pairs", train.size()},
                  {"heldout_preference_pairs", held.size()},
                  {"store", db.string()},
                  {"wall_s", seconds_since(t0)}});
  return summary;
}

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
