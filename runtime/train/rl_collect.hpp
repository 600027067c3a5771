// The stages of the RLHF quickstart that prepare the reward model's data, and pieces the RL stages share:
//   task_sft     supervised fine-tuning of the policy on the addition task's generated training problems
//   preferences  two responses per prompt sampled from the current policy, queued as PairToJudge records in a
//                RocksDB feedback store under the stage's folder, served by the feedback endpoint on a free
//                loopback port, judged over its HTTP API (the scripted annotator, runtime/rl/annotator.hpp, or
//                people on the web page), and the comparisons read back from the store.
// Called from run_rl_stage (rl_stages.hpp).
#pragma once
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/data/tokenizer.hpp"
#include "runtime/model/model.hpp"
#include "runtime/recipe/recipe.hpp"
#include "runtime/safetensors.hpp"
#include "runtime/rl/preferences.hpp"
#include "runtime/rl/task.hpp"
#include "runtime/rl/task_loop.hpp"
#include "runtime/train/metrics.hpp"

namespace moerl {

// A copy of the model's weights, as a SafeTensors to load into another model (the RL stages' frozen reference,
// a reward model's backbone).
SafeTensors weights_of(const Model& model);
// Loads the stage's starting policy into `policy`: `from`'s checkpoint when the stage names one, else nothing
// (the model in memory is the stage before's).
void start_policy(const Recipe& recipe, const StageSpec& stage, Model& policy);

// The task through the run's tokenizer: prompt bos + encode(prompt), answer encode(answer); a response is right
// when it decodes, up to eos, to exactly the answer. `tokenizer` must outlive the codec.
rl::TaskCodec tokenizer_codec(const Tokenizer& tokenizer);

// The text of response ids up to the first eos.
std::string response_text(const Tokenizer& tokenizer, std::span<const int32_t> ids);
// The text a judge sees and the reward model scores: response_text, or kEmptyResponse for a response with no
// text (the feedback store refuses empty texts; the placeholder keeps "answered nothing" a judgeable response).
constexpr const char* kEmptyResponse = "(empty)";
std::string judged_text(const Tokenizer& tokenizer, std::span<const int32_t> ids);

// The problem a task prompt ("07+35=") asks; an Error names the prompt when it is not one of the task's.
rl::Problem parse_task_prompt(const rl::AdditionTask& task, const std::string& prompt);

nlohmann::json run_task_sft(const Recipe& recipe, const StageSpec& stage, Model& policy, const Tokenizer& tokenizer,
                            MetricsLog& metrics, const std::filesystem::path& dir);
nlohmann::json run_preferences(const Recipe& recipe, const StageSpec& stage, Model& policy,
                               const Tokenizer& tokenizer, MetricsLog& metrics, const std::filesystem::path& dir);

// The comparisons judged in preferences stage `stage` (its store, <out>/<stage>/feedback), ties dropped, split
// by prompt: pairs on the task's held-out problems go to `held`. Sorted by content, so the order does not depend
// on the order in which they were judged.
void read_judged_pairs(const Recipe& recipe, const StageSpec& stage, std::vector<PreferencePair>& train,
                       std::vector<PreferencePair>& held);

}  // namespace moerl
