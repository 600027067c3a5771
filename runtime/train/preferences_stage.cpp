// The preferences stage: sampling (in this process or through a PairSource), the feedback endpoint on a
// loopback port, the scripted annotator over HTTP, and the judged pairs written for the reward model.
#include "runtime/util/clock.hpp"
#include "runtime/train/preferences_stage.hpp"

#include <algorithm>
#include <chrono>
#include <random>
#include <thread>

#include "runtime/error.hpp"
#include "runtime/feedback/http_server.hpp"
#include "runtime/feedback/service.hpp"
#include "runtime/rl/annotator.hpp"
#include "runtime/rl/generate.hpp"
#include "runtime/store/pair_record.hpp"
#include "runtime/train/rl_collect.hpp"
#include "runtime/util/files.hpp"
#include "runtime/util/progress.hpp"
#include "runtime/util/threads.hpp"

namespace moerl {
namespace fs = std::filesystem;
namespace {


// A bearer secret: 32 hex digits from the OS's entropy (the endpoint wants >= 16 printable characters).
std::string random_token() {
  std::random_device rd;
  std::string t;
  for (int i = 0; i < 32; ++i) t += "0123456789abcdef"[rd() % 16];
  return t;
}

// Two samples per prompt from `policy` in this process: KV-cache generation, 256 sequences per call, streams
// 2i and 2i + 1 for prompt i. Returns [2 * prompts] response ids.
std::vector<std::vector<int32_t>> sample_in_process(const PairJob& job) {
  std::vector<std::vector<int32_t>> prompts;
  std::vector<uint64_t> streams;
  for (size_t i = 0; i < job.prompt_ids.size(); ++i)
    for (uint64_t k = 0; k < 2; ++k) {
      prompts.push_back(job.prompt_ids[i]);
      streams.push_back(2 * i + k);
    }
  std::vector<std::vector<int32_t>> out;
  const size_t chunk = 256;  // sequences per generate call: progress, and a bounded KV cache
  for (size_t b = 0; b < prompts.size(); b += chunk) {
    const size_t n = std::min(chunk, prompts.size() - b);
    for (auto& g : rl::generate(*job.policy, std::span(prompts).subspan(b, n), job.sampling,
                                std::span(streams).subspan(b, n), job.precision))
      out.push_back(std::move(g.ids));
    if (job.progress) job.progress(static_cast<int64_t>(b + n));
  }
  return out;
}

PairSource* installed_source = nullptr;  // ScopedPairSource's

}  // namespace

ScopedPairSource::ScopedPairSource(PairSource* source) : previous_(installed_source) { installed_source = source; }
ScopedPairSource::~ScopedPairSource() { installed_source = previous_; }

nlohmann::json run_preferences(const Recipe& recipe, const StageSpec& stage, Model& policy, const Tokenizer& tokenizer,
                               MetricsLog& metrics, const fs::path& dir) {
  return run_preferences(recipe, stage, policy, tokenizer, metrics, dir, installed_source);
}

nlohmann::json run_preferences(const Recipe& recipe, const StageSpec& stage, Model& policy, const Tokenizer& tokenizer,
                               MetricsLog& metrics, const fs::path& dir, PairSource* source) {
  const auto t0 = std::chrono::steady_clock::now();
  start_policy(recipe, stage, policy);
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
  PairJob job;
  job.stage = stage.name;
  job.policy = &policy;
  job.precision = recipe.precision;
  job.threads = resolve_threads(recipe.threads);
  job.sampling = rl::task_sampling(task, recipe.seed + 311, tokenizer.eos_id());
  job.sampling.temperature = static_cast<float>(stage.rl.temperature);
  job.sampling.max_new_tokens = static_cast<uint32_t>(stage.rl.max_new_tokens);
  for (const auto& p : problems) {
    job.prompts.push_back(p.prompt);
    job.prompt_ids.push_back(codec.prompt_ids(p));
  }
  job.dir = dir;
  job.metrics = &metrics;
  job.text = [&tokenizer](std::span<const int32_t> ids) { return judged_text(tokenizer, ids); };

  // A fresh store under the stage's folder (a finished stage is skipped before this; a crashed one restarts).
  const fs::path db = dir / "feedback", tokens = dir / "tokens";
  fs::remove_all(db);
  const std::string admin = random_token(), annotator = random_token();
  write_file_durably(tokens, "# the feedback endpoint's bearer tokens of this run (moerl feedback serve --tokens)\n"
                             "admin admin " + admin + "\nannotator scripted " + annotator + "\n");
  fs::permissions(tokens, fs::perms::owner_read | fs::perms::owner_write);
  nlohmann::json summary;
  int64_t correct = 0, sampled = 0;
  {
    store::DurableStore store(db.string());
    job.feedback = &store;
    std::vector<std::vector<int32_t>> responses;
    {
      ProgressBar bar(stage.name + " sample", static_cast<int64_t>(2 * problems.size()), "seq");
      job.progress = [&bar](int64_t n) { bar.update(n, n, ""); };
      // Through the source, the pairs are queued in the store before the endpoint opens on it (it reads them then).
      responses = source ? source->sample_and_queue(job) : sample_in_process(job);
      require(responses.size() == 2 * problems.size(),
              "preferences stage " + stage.name + ": the pair source returned " + std::to_string(responses.size()) +
                  " responses, expected " + std::to_string(2 * problems.size()));
      bar.finish(std::to_string(responses.size()) + " responses");
    }
    sampled = static_cast<int64_t>(responses.size());
    for (size_t n = 0; n < responses.size(); ++n) correct += codec.check(problems[n / 2], responses[n]);

    feedback::ServiceOptions options;
    options.rate_per_s = 0;  // one local annotator judging as fast as it can: no per-token limit
    // The judgements go through the source's sink (the feedback collector actor on the actor path), declared
    // before the service and the server so that it ends after them and before the store.
    std::unique_ptr<feedback::RecordSink> sink = source ? source->judgement_sink(job) : nullptr;
    if (!sink) sink = std::make_unique<feedback::StoreSink>(store);
    feedback::FeedbackService service(store, *sink, feedback::read_tokens(tokens.string()), options);
    if (!source) {
      const msg::PolicyVersion version{0, 0};
      for (size_t i = 0; i < problems.size(); ++i) {
        if (responses[2 * i] == responses[2 * i + 1]) continue;  // identical: a certain tie, nothing to judge
        store::PairToJudge pair;
        pair.prompt = {problems[i].prompt, job.prompt_ids[i]};
        pair.first = {judged_text(tokenizer, responses[2 * i]), responses[2 * i]};
        pair.second = {judged_text(tokenizer, responses[2 * i + 1]), responses[2 * i + 1]};
        pair.first_policy = pair.second_policy = version;
        service.add_pair(std::move(pair));
      }
    }
    int64_t distinct = 0;
    for (size_t i = 0; i < problems.size(); ++i) distinct += responses[2 * i] != responses[2 * i + 1];
    const int64_t queued = static_cast<int64_t>(service.pairs());
    require(queued == distinct,
            "preferences stage " + stage.name + ": " + std::to_string(queued) + " pairs queued in " + db.string() +
                ", expected " + std::to_string(distinct) + " (the prompts whose two responses differ)");
    feedback::HttpServer server(service, 4);
    const int port = server.bind("127.0.0.1", 0);
    std::thread serving([&server] { server.run(); });
    const std::string url = "http://127.0.0.1:" + std::to_string(port) + "/";
    std::fprintf(stderr, "%-10s feedback page %s  (tokens: %s; %lld pairs queued; judged by the %s annotator)\n",
                 stage.name.c_str(), url.c_str(), tokens.c_str(), static_cast<long long>(queued),
                 stage.rl.annotator.c_str());
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
    summary = {{"url", url}, {"tokens", tokens.string()}, {"pairs_queued", queued},
               {"identical_pairs_skipped", static_cast<int64_t>(problems.size()) - queued},
               {"pairs_judged", judged.judged},
               {"ties", judged.ties}, {"rate_limited", judged.rate_limited},
               {"comparisons_stored", store.count(store::Family::Comparison)},
               {"judgements_through", sink->name()}};
  }
  std::vector<PreferencePair> train, held;
  read_judged_pairs(recipe, stage, train, held);
  write_preferences(recipe.out / "preferences" / (stage.name + ".jsonl"), train);
  write_preferences(recipe.out / "preferences" / (stage.name + "-heldout.jsonl"), held);
  const double policy_accuracy = sampled == 0 ? 0.0 : static_cast<double>(correct) / static_cast<double>(sampled);
  metrics.write({{"stage", stage.name}, {"step", 0}, {"sampled_accuracy", policy_accuracy},
                 {"preference_pairs", train.size()}, {"heldout_preference_pairs", held.size()}});
  summary.update({{"stage", stage.name},
                  {"kind", stage.kind},
                  {"steps", 0},
                  {"annotator", stage.rl.annotator},
                  {"pair_source", source ? source->name() : std::string("in-process")},
                  {"sampled_accuracy", policy_accuracy},
                  {"preference_pairs", train.size()},
                  {"heldout_preference_pairs", held.size()},
                  {"store", db.string()},
                  {"wall_s", seconds_since(t0)}});
  return summary;
}

}  // namespace moerl
