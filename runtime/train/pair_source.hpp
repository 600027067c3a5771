// Where the preferences stage's pairs come from: two sampled responses per prompt, queued for judging as
// PairToJudge records in the stage's feedback store. Without a PairSource, run_preferences samples them in this
// process and queues them itself; a PairSource given to it does both instead — the actor path
// (actors/roles/preference_pairs.hpp: the rollout actor -> the replay buffer actor -> the feedback collector
// actor). runtime/ knows only this interface, not the actors. The source also says where the judgements taken
// over HTTP go (judgement_sink: the feedback collector actor for the actor path).
#pragma once
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "kernels/linear.hpp"
#include "runtime/feedback/record_sink.hpp"
#include "runtime/messages/types.hpp"
#include "runtime/model/model.hpp"
#include "runtime/store/durable_store.hpp"
#include "runtime/train/metrics.hpp"

namespace moerl {

struct PairJob {
  std::string stage;                              // the stage's name (records' step ids, actor names)
  Model* policy = nullptr;                        // the current policy, not updated while the job runs
  Precision precision = Precision::FP32;
  int threads = 0;                                // > 0: the CPU thread count for generation (the recipe's, resolved)
  std::vector<std::string> prompts;               // [pairs] prompt texts
  std::vector<std::vector<int32_t>> prompt_ids;   // [pairs] their ids (bos + prompt)
  msg::SamplingParams sampling;                   // the stage's temperature, max_new_tokens, stop ids and seed
  std::filesystem::path dir;                      // the stage's folder: a source keeps its own stores under it
  store::DurableStore* feedback = nullptr;        // the stage's feedback store, where the pairs go
  std::function<std::string(std::span<const int32_t>)> text;  // what a judge sees of a response's ids
  std::function<void(int64_t)> progress;          // sequences sampled so far (may be empty)
  MetricsLog* metrics = nullptr;                  // for events (a restarted actor); may be null
};

class PairSource {
 public:
  virtual ~PairSource() = default;
  // Samples two responses per prompt and queues them in job.feedback as PairToJudge records, prompt i's with
  // pair id i + 1, every one durable on return; a prompt whose two responses are the same ids is not queued (a
  // certain tie: no one needs to read it). Returns the response ids, [2 * pairs]: prompt i's at 2i (the
  // pair's first) and 2i + 1 (its second). Throws moerl::Error naming what failed.
  virtual std::vector<std::vector<int32_t>> sample_and_queue(const PairJob& job) = 0;
  // Where the feedback endpoint of the stage sends the judgements (and any pair posted over HTTP): a sink on
  // job.feedback, ended (its writes answered) before the caller closes that store. nullptr: straight into the
  // store (feedback::StoreSink).
  virtual std::unique_ptr<feedback::RecordSink> judgement_sink(const PairJob&) { return nullptr; }
  // For the stage's summary ("pair_source"), e.g. "actors".
  virtual std::string name() const = 0;
};

}  // namespace moerl
