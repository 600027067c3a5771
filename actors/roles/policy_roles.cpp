// The roles that run a model forward for RLHF: rollout (generation), reward model (scoring), reference
// policy (log-probabilities for the KL term), and the expert shard (routed experts of one MoE layer).
#include <algorithm>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>

#include "actors/roles/expert_shard.hpp"
#include "actors/roles/reference.hpp"
#include "actors/roles/reward_model.hpp"
#include "actors/roles/rollout.hpp"
#include "kernels/swiglu.hpp"
#include "runtime/rl/reward_model.hpp"
#include "runtime/safetensors.hpp"
#include "runtime/train/checkpoint.hpp"
#include "runtime/train/step_policy.hpp"
#include "runtime/util/threads.hpp"

namespace moerl::actors {
namespace fs = std::filesystem;

namespace {

msg::DecodeLimits limits_for(const Model& model) {
  msg::DecodeLimits l;
  l.vocab = model.config().vocab_size;
  return l;
}

// ---- rollout ----

struct RolloutState {
  std::string name;
  Precision precision = Precision::FP32;
  int threads = 0;  // > 0: set on the actor's own thread before each request (OpenMP's count is per thread)
  LoadedModel policy;
  std::shared_ptr<Model> shared;  // in-process weights (the trainer's model) when the last weights were those
  msg::PolicyVersion version;
};

rollout_actor::behavior_type rollout(rollout_actor::stateful_pointer<RolloutState> self, fs::path model_dir,
                                     Precision precision, std::string name, int threads) {
  auto& st = self->state;
  st.name = std::move(name);
  st.precision = precision;
  st.threads = threads;
  std::string load_error;
  try {
    st.policy = load_model_dir(model_dir);
  } catch (const std::exception& e) {
    load_error = e.what();  // answered to every request: the actor stays up so the driver sees why
  }
  return {
      [&st, load_error](generate_atom, const Envelope& e) {
        return guarded(st.name, [&] {
          if (st.threads > 0) use_threads(st.threads);
          require(st.shared || load_error.empty(), load_error);
          Model& model = st.shared ? *st.shared : *st.policy.model;
          const auto req = unwrap<msg::GenerationRequest>(e, limits_for(model));
          if (req.policy_version.version > st.version.version)
            throw Refusal(msg::ErrorCode::StaleVersion,
                          "GenerationRequest.policyVersion: version " + std::to_string(req.policy_version.version) +
                              ", newer than the weights held (version " + std::to_string(st.version.version) + ")");
          std::vector<Envelope> out;
          std::vector<uint64_t> streams;
          for (uint32_t s = 0; s < req.samples; ++s) streams.push_back(req.request_id * 1025 + s);
          const std::vector<Generation> gens =
              generate_samples(model, req.prompt_ids, req.sampling, streams, st.precision);
          for (uint32_t s = 0; s < req.samples; ++s) {
            const Generation& g = gens[s];
            out.push_back(wrap(msg::Rollout{req.request_id, s, req.prompt_ids, g.ids, g.log_probs, st.version, g.finish}));
          }
          return out;
        });
      },
      [&st](weights_atom, const std::string& folder, uint64_t version, uint64_t step) {
        return guarded(st.name, [&] {
          if (version < st.version.version)
            throw Refusal(msg::ErrorCode::StaleVersion, "weights: version " + std::to_string(version) +
                                                            " is older than the one held (" +
                                                            std::to_string(st.version.version) + ")");
          st.policy = load_model_dir(folder);
          st.shared.reset();
          st.version = msg::PolicyVersion{version, step};
          return version;
        });
      },
      [&st](weights_atom, std::shared_ptr<Model> model, uint64_t version, uint64_t step) {
        return guarded(st.name, [&] {
          if (version < st.version.version)
            throw Refusal(msg::ErrorCode::StaleVersion, "weights: version " + std::to_string(version) +
                                                            " is older than the one held (" +
                                                            std::to_string(st.version.version) + ")");
          require(model != nullptr, "weights: an in-process weights message without a model");
          st.shared = std::move(model);
          st.version = msg::PolicyVersion{version, step};
          return version;
        });
      },
  };
}

// ---- reward model and reference policy ----

struct ScorerState {
  std::string name;
  Precision precision = Precision::FP32;
  LoadedModel model;
  std::string load_error;

  Model& get() {
    require(load_error.empty(), load_error);
    return *model.model;
  }
};

void load_scorer(ScorerState& st, const fs::path& dir, Precision precision, std::string name) {
  st.name = std::move(name);
  st.precision = precision;
  try {
    st.model = load_model_dir(dir);
  } catch (const std::exception& e) {
    st.load_error = e.what();
  }
}

// A trained reward model (a folder RewardModel::save wrote: architectures DeepseekV3ForSequenceClassification)
// scores with its scalar head; a policy folder falls back to the mean log-likelihood placeholder.
struct RewardState : ScorerState {
  std::unique_ptr<RewardModel> head;
  int threads = 0;  // as RolloutState's
};

bool is_reward_model_dir(const fs::path& dir) {
  std::ifstream in(dir / "config.json");
  if (!in) return false;
  const auto j = nlohmann::json::parse(in, nullptr, false);
  if (!j.is_object() || !j.contains("architectures") || !j["architectures"].is_array()) return false;
  for (const auto& a : j["architectures"])
    if (a == "DeepseekV3ForSequenceClassification") return true;
  return false;
}

reward_model_actor::behavior_type reward_model(reward_model_actor::stateful_pointer<RewardState> self, fs::path dir,
                                               Precision precision, std::string name, int threads) {
  auto& st = self->state;
  st.threads = threads;
  if (is_reward_model_dir(dir)) {
    st.name = std::move(name);
    st.precision = precision;
    try {
      st.head = RewardModel::load(dir);
    } catch (const std::exception& e) {
      st.load_error = e.what();
    }
  } else {
    load_scorer(st, dir, precision, std::move(name));
  }
  return {
      [&st](score_atom, const Envelope& e) {
        return guarded(st.name, [&] {
          if (st.threads > 0) use_threads(st.threads);
          require(st.load_error.empty(), st.load_error);
          if (st.head) {
            msg::DecodeLimits limits;
            limits.vocab = st.head->config().vocab_size;
            const auto r = unwrap<msg::Rollout>(e, limits);
            const float score = st.head->score_rollout(r.prompt_ids, r.response_ids, st.precision);
            return wrap(msg::RewardScore{r.request_id, r.sample_index, score, st.name});
          }
          Model& model = st.get();
          const auto r = unwrap<msg::Rollout>(e, limits_for(model));
          const std::vector<float> lp = response_log_probs(model, r.prompt_ids, r.response_ids, st.precision);
          double sum = 0;
          for (float v : lp) sum += v;
          const float score = lp.empty() ? 0.0f : static_cast<float>(sum / static_cast<double>(lp.size()));
          return wrap(msg::RewardScore{r.request_id, r.sample_index, score, st.name});
        });
      },
  };
}

reference_actor::behavior_type reference(reference_actor::stateful_pointer<ScorerState> self, fs::path dir,
                                         Precision precision, std::string name) {
  auto& st = self->state;
  load_scorer(st, dir, precision, std::move(name));
  return {
      [&st](logprobs_atom, const Envelope& e) {
        return guarded(st.name, [&] {
          Model& model = st.get();
          msg::Rollout r = unwrap<msg::Rollout>(e, limits_for(model));
          r.log_probs = response_log_probs(model, r.prompt_ids, r.response_ids, st.precision);
          for (float& v : r.log_probs) v = std::min(v, 0.0f);
          return wrap(r);
        });
      },
  };
}

// ---- expert shard ----

struct ExpertWeights {
  Tensor gate, up, down;  // [intermediate, hidden], [intermediate, hidden], [hidden, intermediate]
};

struct ExpertShardState {
  std::string name;
  ExpertShardSetup setup;
  std::vector<ExpertWeights> experts;  // as setup.experts
  int64_t hidden = 0, intermediate = 0;
  std::string load_error;

  void load() {
    const LoadedModel m = load_model_dir(setup.model_dir);
    const ModelConfig& c = m.model->config();
    hidden = c.hidden_size;
    intermediate = c.moe_intermediate_size;
    require(!setup.experts.empty() && std::is_sorted(setup.experts.begin(), setup.experts.end()) &&
                std::adjacent_find(setup.experts.begin(), setup.experts.end()) == setup.experts.end(),
            name + ": experts must be distinct and ascending");
    const auto& params = m.model->params();
    for (int64_t e : setup.experts) {
      require(e >= 0 && e < c.n_routed_experts, name + ": expert " + std::to_string(e) + " is not in [0, " +
                                                    std::to_string(c.n_routed_experts) + ")");
      const std::string p = setup.layer + ".experts." + std::to_string(e) + ".";
      experts.push_back(ExpertWeights{params.at(p + "gate_proj.weight").value.clone(),
                                      params.at(p + "up_proj.weight").value.clone(),
                                      params.at(p + "down_proj.weight").value.clone()});
    }
  }
};

msg::TensorRef inline_tensor(const std::string& name, DType dtype, Shape shape, const void* data) {
  msg::TensorRef t;
  t.name = name;
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.transport = msg::Transport::Inline;
  t.byte_size = dtype_size(dtype);
  for (int64_t d : t.shape) t.byte_size *= static_cast<uint64_t>(d);
  const auto* bytes = static_cast<const uint8_t*>(data);
  t.inline_data.assign(bytes, bytes + t.byte_size);
  return t;
}

expert_shard_actor::behavior_type expert_shard(expert_shard_actor::stateful_pointer<ExpertShardState> self,
                                               ExpertShardSetup setup, std::string name) {
  auto& st = self->state;
  st.name = std::move(name);
  st.setup = std::move(setup);
  try {
    st.load();
  } catch (const std::exception& e) {
    st.load_error = e.what();
  }
  return {
      [&st](describe_atom) {
        return guarded(st.name, [&] {
          require(st.load_error.empty(), st.load_error);
          return st.setup.experts;
        });
      },
      [&st](forward_atom, const Envelope& counts_env, const Envelope& rows_env) {
        return guarded(st.name, [&] {
          require(st.load_error.empty(), st.load_error);
          const auto counts = unwrap<msg::TensorRef>(counts_env);
          const auto rows = unwrap<msg::TensorRef>(rows_env);
          const auto n_experts = static_cast<int64_t>(st.experts.size());
          require(counts.transport == msg::Transport::Inline && counts.dtype == DType::I64 &&
                      counts.shape == Shape{n_experts},
                  "forward: counts must be an inline I64 [" + std::to_string(n_experts) + "] tensor");
          std::vector<int64_t> n(static_cast<size_t>(n_experts));
          std::memcpy(n.data(), counts.inline_data.data(), counts.inline_data.size());
          int64_t total = 0;
          for (int64_t c : n) {
            require(c >= 0, "forward: counts: " + std::to_string(c) + ", expected >= 0");
            total += c;
          }
          require(rows.transport == msg::Transport::Inline && rows.dtype == DType::F32 &&
                      rows.shape == Shape{total, st.hidden},
                  "forward: rows must be an inline F32 [" + std::to_string(total) + ", " + std::to_string(st.hidden) +
                      "] tensor (Σ counts, hidden)");
          std::vector<float> x(static_cast<size_t>(total * st.hidden)), y(x.size());
          std::memcpy(x.data(), rows.inline_data.data(), rows.inline_data.size());
          std::vector<float> g, u, h;
          int64_t row = 0;
          for (int64_t i = 0; i < n_experts; ++i) {
            const int64_t m = n[static_cast<size_t>(i)];
            if (m == 0) continue;
            const ExpertWeights& w = st.experts[static_cast<size_t>(i)];
            g.resize(static_cast<size_t>(m * st.intermediate));
            u.resize(g.size());
            h.resize(g.size());
            const float* xi = x.data() + row * st.hidden;
            cpu::linear_forward(st.setup.precision, xi, w.gate.data<float>(), g.data(), m, st.intermediate, st.hidden);
            cpu::linear_forward(st.setup.precision, xi, w.up.data<float>(), u.data(), m, st.intermediate, st.hidden);
            cpu::swiglu_forward(g.data(), u.data(), h.data(), m * st.intermediate);
            cpu::linear_forward(st.setup.precision, h.data(), w.down.data<float>(), y.data() + row * st.hidden, m,
                                st.hidden, st.intermediate);
            row += m;
          }
          return wrap(inline_tensor(rows.name + "/experts", DType::F32, {total, st.hidden}, y.data()));
        });
      },
  };
}

}  // namespace

rollout_actor spawn_rollout(caf::actor_system& system, fs::path model_dir, Precision precision, std::string name,
                            int threads) {
  return system.spawn<caf::detached>(rollout, std::move(model_dir), precision, std::move(name), threads);
}

reward_model_actor spawn_reward_model(caf::actor_system& system, fs::path model_dir, Precision precision,
                                      std::string name, int threads) {
  return system.spawn<caf::detached>(reward_model, std::move(model_dir), precision, std::move(name), threads);
}

reference_actor spawn_reference(caf::actor_system& system, fs::path model_dir, Precision precision, std::string name) {
  return system.spawn<caf::detached>(reference, std::move(model_dir), precision, std::move(name));
}

expert_shard_actor spawn_expert_shard(caf::actor_system& system, ExpertShardSetup setup, std::string name) {
  return system.spawn<caf::detached>(expert_shard, std::move(setup), std::move(name));
}

}  // namespace moerl::actors
