// The preferences stage (rl_collect.hpp describes it): two responses per prompt from the current policy,
// queued as PairToJudge records in a RocksDB feedback store under the stage's folder, served by the feedback
// endpoint on a free loopback port, judged over its HTTP API, the comparisons read back from the store.
#pragma once
#include <filesystem>

#include <nlohmann/json.hpp>

#include "runtime/data/tokenizer.hpp"
#include "runtime/model/model.hpp"
#include "runtime/recipe/recipe.hpp"
#include "runtime/train/metrics.hpp"
#include "runtime/train/pair_source.hpp"

namespace moerl {

// With `source` null the pairs are sampled in this process (rl::generate, 256 sequences per call, streams 2i
// and 2i + 1 for prompt i); otherwise `source` samples and queues them (e.g. through the actors), and the
// endpoint's judgements go to the source's judgement_sink (the feedback collector actor). Summary:
// pairs_queued, pairs_judged, ties, comparisons_stored, sampled_accuracy, preference_pairs, ..., "pair_source"
// ("in-process" or the source's name) and "judgements_through" ("store" or the sink's name).
nlohmann::json run_preferences(const Recipe& recipe, const StageSpec& stage, Model& policy, const Tokenizer& tokenizer,
                               MetricsLog& metrics, const std::filesystem::path& dir, PairSource* source);

// While alive, run_preferences without a source argument (run_rl_stage's call, rl_collect.hpp) uses `source`
// (e.g. actors::ActorPairSource) instead of sampling in this process. Like ScopedRlhfServices: not thread-safe,
// install it before run_recipe and keep it until run_recipe returns; nests (the innermost wins).
class ScopedPairSource {
 public:
  explicit ScopedPairSource(PairSource* source);
  ~ScopedPairSource();
  ScopedPairSource(const ScopedPairSource&) = delete;
  ScopedPairSource& operator=(const ScopedPairSource&) = delete;

 private:
  PairSource* previous_;
};

}  // namespace moerl
