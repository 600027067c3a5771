#include "runtime/rl/reward_model.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>

#include "kernels/rmsnorm.hpp"
#include "runtime/error.hpp"
#include "runtime/safetensors.hpp"
#include "runtime/util/files.hpp"

namespace moerl {
namespace {

constexpr const char* kHead = "score.weight";
constexpr const char* kNorm = "model.norm.weight";

// log(1 + e^x) without overflow.
double softplus(double x) { return x > 0 ? x + std::log1p(std::exp(-x)) : std::log1p(std::exp(x)); }
double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// The backbone holds no MTP layer: a reward model scores, it does not predict the token after next.
ModelConfig backbone_config(ModelConfig c) {
  c.num_nextn_predict_layers = 0;
  return c;
}

}  // namespace

RewardModel::RewardModel(const ModelConfig& config) : config_(backbone_config(config)) {
  config_.validate("reward model");
  backbone_ = std::make_unique<ModelPart>(config_, params_, PartSpec{0, -1, true, false});
  norm_ = &params_.add(kNorm, {config_.hidden_size});
  head_ = &params_.add(kHead, {1, config_.hidden_size});
  std::fill_n(norm_->value.data<float>(), config_.hidden_size, 1.0f);
}

RewardModel::~RewardModel() = default;

void RewardModel::init_random(uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, static_cast<float>(config_.initializer_range));
  for (auto& [name, p] : params_.all()) {  // name order, as Model::init_random
    float* v = p.value.data<float>();
    const bool is_norm = name.find("norm.weight") != std::string::npos;
    const bool is_bias = name.find("e_score_correction_bias") != std::string::npos;
    for (int64_t i = 0; i < p.value.numel(); ++i) v[i] = is_norm ? 1.0f : is_bias ? 0.0f : normal(rng);
  }
}

void RewardModel::load_weights(const SafeTensors& st) {
  for (auto& [name, p] : params_.all()) {
    auto it = st.tensors.find(name);
    if (it == st.tensors.end() && name == kHead) continue;
    require(it != st.tensors.end(), st.source + ": missing tensor " + name + " (shape " +
                                        shape_string(p.value.shape()) + ") for the reward model");
    require(it->second.shape() == p.value.shape(), st.source + ": tensor " + name + " has shape " +
                                                       shape_string(it->second.shape()) + ", the reward model expects " +
                                                       shape_string(p.value.shape()));
    require(it->second.dtype() == DType::F32 || it->second.dtype() == DType::BF16 || it->second.dtype() == DType::F16,
            st.source + ": tensor " + name + " has dtype " + std::string(dtype_name(it->second.dtype())) +
                ", expected F32, BF16 or F16");
    p.value = it->second.to(DType::F32);
  }
}

std::vector<float> RewardModel::forward_scores(const std::vector<const std::vector<int32_t>*>& seqs,
                                               const std::vector<int64_t>& starts, Precision precision, bool train) {
  const int64_t B = static_cast<int64_t>(seqs.size()), D = config_.hidden_size;
  require(B > 0, "reward model: no sequences to score");
  require(starts.size() == seqs.size(), "reward model: one response start per sequence expected");
  int64_t S = 0;
  for (size_t b = 0; b < seqs.size(); ++b) {
    const auto n = static_cast<int64_t>(seqs[b]->size());
    require(starts[b] >= 0 && starts[b] < n, "reward model: sequence " + std::to_string(b) + " of " +
                                                 std::to_string(n) + " tokens has its response start at " +
                                                 std::to_string(starts[b]) + ": no response token to score");
    S = std::max(S, n);
  }
  require(S <= config_.max_position_embeddings,
          "reward model: a sequence of " + std::to_string(S) + " tokens exceeds max_position_embeddings " +
              std::to_string(config_.max_position_embeddings));
  // Right padding with token 2 (<pad>; any id works: causal attention keeps it out of the scored positions).
  std::vector<int64_t> ids(static_cast<size_t>(B * S), 2);
  rows_.clear();
  row_seq_.clear();
  for (int64_t b = 0; b < B; ++b) {
    const auto& s = *seqs[static_cast<size_t>(b)];
    std::copy(s.begin(), s.end(), ids.begin() + b * S);
    const int64_t len = static_cast<int64_t>(s.size());
    for (int64_t t = starts[static_cast<size_t>(b)]; t < len; ++t) rows_.push_back(b * S + t), row_seq_.push_back(b);
  }
  ForwardOptions o;
  o.precision = precision;
  o.for_backward = train;
  LossDenominators whole;
  whole.sequences = B;
  // The backbone has no head and reads no labels, but ModelPart::forward formats every label into its error
  // messages: give it ignored ones.
  const std::vector<int64_t> labels(ids.size(), kIgnoreLabel);
  std::vector<float> hidden(static_cast<size_t>(B * S * D));
  backbone_->forward(TokenBatch{ids.data(), labels.data(), B, S}, nullptr, hidden.data(), o, whole);
  batch_ = B;
  seq_ = S;
  const int64_t N = static_cast<int64_t>(rows_.size());
  row_hidden_.resize(static_cast<size_t>(N * D));
  for (int64_t n = 0; n < N; ++n)
    std::copy_n(hidden.begin() + rows_[static_cast<size_t>(n)] * D, D, row_hidden_.begin() + n * D);
  normed_.resize(static_cast<size_t>(N * D));
  rstd_.resize(static_cast<size_t>(N));
  cpu::rmsnorm_forward(row_hidden_.data(), norm_->value.data<float>(), normed_.data(), rstd_.data(), N, D,
                       static_cast<float>(config_.rms_norm_eps));
  // The head stays in FP32 in every precision, as the LM head does.
  std::vector<double> acc(static_cast<size_t>(B), 0.0);
  const float* w = head_->value.data<float>();
  for (int64_t n = 0; n < N; ++n) {
    double a = 0;
    for (int64_t d = 0; d < D; ++d) a += static_cast<double>(w[d]) * normed_[static_cast<size_t>(n * D + d)];
    acc[static_cast<size_t>(row_seq_[static_cast<size_t>(n)])] += a;
  }
  return std::vector<float>(acc.begin(), acc.end());
}

void RewardModel::backward_scores(std::span<const float> dr) {
  const int64_t B = batch_, S = seq_, D = config_.hidden_size, N = static_cast<int64_t>(rows_.size());
  require(static_cast<int64_t>(dr.size()) == B, "reward model: one gradient per scored sequence expected");
  const float* w = head_->value.data<float>();
  float* dw = head_->grad.data<float>();
  std::vector<float> dnormed(static_cast<size_t>(N * D)), drow(static_cast<size_t>(N * D));
  auto dr_of = [&](int64_t n) { return dr[static_cast<size_t>(row_seq_[static_cast<size_t>(n)])]; };
  for (int64_t d = 0; d < D; ++d) {
    double g = 0;
    for (int64_t n = 0; n < N; ++n) g += static_cast<double>(dr_of(n)) * normed_[static_cast<size_t>(n * D + d)];
    dw[d] += static_cast<float>(g);
  }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t d = 0; d < D; ++d) dnormed[static_cast<size_t>(n * D + d)] = dr_of(n) * w[d];
  cpu::rmsnorm_backward(dnormed.data(), row_hidden_.data(), norm_->value.data<float>(), rstd_.data(), drow.data(),
                        norm_->grad.data<float>(), N, D);
  std::vector<float> dhidden(static_cast<size_t>(B * S * D), 0.0f);
  for (int64_t n = 0; n < N; ++n)
    std::copy_n(drow.begin() + n * D, D, dhidden.begin() + rows_[static_cast<size_t>(n)] * D);
  backbone_->backward(dhidden.data(), nullptr);
}

std::vector<float> RewardModel::score(const std::vector<std::vector<int32_t>>& sequences,
                                      const std::vector<int64_t>& response_starts, Precision precision) {
  std::vector<const std::vector<int32_t>*> ptrs;
  for (const auto& s : sequences) ptrs.push_back(&s);
  return forward_scores(ptrs, response_starts, precision, false);
}

float RewardModel::score_rollout(std::span<const int32_t> prompt, std::span<const int32_t> response,
                                 Precision precision) {
  std::vector<int32_t> seq(prompt.begin(), prompt.end());
  seq.insert(seq.end(), response.begin(), response.end());
  const auto eos = static_cast<int32_t>(config_.eos_token_id);
  if (seq.empty() || seq.back() != eos) seq.push_back(eos);
  const auto start = static_cast<int64_t>(prompt.size());
  require(start < static_cast<int64_t>(seq.size()), "reward model: a rollout without response tokens");
  return score({seq}, {start}, precision).front();
}

PairMetrics RewardModel::forward_backward(std::span<const TokenPair> pairs, Precision precision, double scale) {
  const int64_t P = static_cast<int64_t>(pairs.size());
  require(P > 0, "reward model: no preference pairs in the batch");
  // One batch: chosen sequences in rows [0, P), rejected in [P, 2P).
  std::vector<const std::vector<int32_t>*> seqs;
  std::vector<int64_t> starts;
  for (const auto& p : pairs) seqs.push_back(&p.chosen), starts.push_back(p.response_start);
  for (const auto& p : pairs) seqs.push_back(&p.rejected), starts.push_back(p.response_start);
  const auto r = forward_scores(seqs, starts, precision, true);
  PairMetrics m;
  m.pairs = P;
  std::vector<float> dr(static_cast<size_t>(2 * P));
  for (int64_t i = 0; i < P; ++i) {
    const double margin = static_cast<double>(r[static_cast<size_t>(i)]) - r[static_cast<size_t>(P + i)];
    m.loss += softplus(-margin);
    m.accuracy += margin > 0;
    m.margin += margin;
    // d/d margin of softplus(−margin) = −σ(−margin); the loss is a mean over P pairs.
    const double g = -sigmoid(-margin) * scale / static_cast<double>(P);
    dr[static_cast<size_t>(i)] = static_cast<float>(g);
    dr[static_cast<size_t>(P + i)] = static_cast<float>(-g);
  }
  backward_scores(dr);
  m.loss /= static_cast<double>(P);
  m.accuracy /= static_cast<double>(P);
  m.margin /= static_cast<double>(P);
  return m;
}

PairMetrics RewardModel::evaluate(std::span<const TokenPair> pairs, Precision precision, int64_t batch) {
  PairMetrics m;
  m.pairs = static_cast<int64_t>(pairs.size());
  if (pairs.empty()) return m;
  for (size_t start = 0; start < pairs.size(); start += static_cast<size_t>(batch)) {
    const size_t end = std::min(pairs.size(), start + static_cast<size_t>(batch));
    std::vector<const std::vector<int32_t>*> seqs;
    std::vector<int64_t> starts;
    for (size_t i = start; i < end; ++i) seqs.push_back(&pairs[i].chosen), starts.push_back(pairs[i].response_start);
    for (size_t i = start; i < end; ++i) seqs.push_back(&pairs[i].rejected), starts.push_back(pairs[i].response_start);
    const auto r = forward_scores(seqs, starts, precision, false);
    const size_t n = end - start;
    for (size_t i = 0; i < n; ++i) {
      const double margin = static_cast<double>(r[i]) - r[n + i];
      m.loss += softplus(-margin);
      m.accuracy += margin > 0;
      m.margin += margin;
    }
  }
  const double n = static_cast<double>(pairs.size());
  m.loss /= n;
  m.accuracy /= n;
  m.margin /= n;
  return m;
}

void RewardModel::update_router_bias(float gamma) { backbone_->update_router_bias(gamma); }

void RewardModel::save(const std::filesystem::path& dir) const {
  std::filesystem::create_directories(dir);
  nlohmann::json cfg = config_.to_hf_json();
  cfg["architectures"] = nlohmann::json::array({"DeepseekV3ForSequenceClassification"});
  cfg["num_labels"] = 1;
  cfg["moerl_score_pooling"] = "response_sum";  // HF's class reads the last token: its scores differ
  write_file_durably(dir / "config.json", cfg.dump(2) + "\n");
  std::map<std::string, const Tensor*> tensors;
  for (const auto& [name, p] : params_.all()) tensors[name] = &p.value;
  write_safetensors(dir / "model.safetensors", tensors, {{"format", "pt"}, {"moerl", "reward_model"}});
}

std::unique_ptr<RewardModel> RewardModel::load(const std::filesystem::path& dir) {
  const auto cfg_file = dir / "config.json";
  std::ifstream in(cfg_file);
  require(in.good(), cfg_file.string() + ": cannot open the reward model's config");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw Error(cfg_file.string() + ": not valid JSON: " + e.what());
  }
  auto rm = std::make_unique<RewardModel>(ModelConfig::from_hf_json(j, cfg_file.string()));
  const auto st = read_safetensors(dir / "model.safetensors");
  require(st.tensors.count(kHead) != 0, st.source + ": missing tensor score.weight (not a reward model)");
  rm->load_weights(st);
  return rm;
}

RewardTrainResult train_reward_model(RewardModel& rm, std::span<const TokenPair> train,
                                     std::span<const TokenPair> heldout, const RewardTrainConfig& config,
                                     const RewardStepCallback& on_step) {
  require(!train.empty(), "reward model training: no training pairs");
  require(config.steps > 0 && config.batch > 0, "reward model training: steps and batch must be positive");
  const auto t0 = std::chrono::steady_clock::now();
  AdamWConfig oc = config.optimizer;
  oc.total_steps = config.steps;
  AdamW opt(rm.params(), oc);
  std::mt19937_64 rng(config.seed);
  std::vector<size_t> order(train.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::shuffle(order.begin(), order.end(), rng);
  size_t cursor = 0;
  RewardTrainResult result;
  std::vector<TokenPair> batch;
  for (int64_t step = 0; step < config.steps; ++step) {
    batch.clear();
    for (int64_t i = 0; i < config.batch; ++i) {
      if (cursor == order.size()) {
        std::shuffle(order.begin(), order.end(), rng);
        cursor = 0;
      }
      batch.push_back(train[order[cursor++]]);
    }
    rm.params().zero_grad();
    const PairMetrics m = rm.forward_backward(batch, config.precision);
    opt.step(step);
    if (config.bias_gamma > 0) rm.update_router_bias(config.bias_gamma);
    result.steps.push_back(m);
    if (config.eval_every > 0 && (step + 1) % config.eval_every == 0 && step + 1 < config.steps && !heldout.empty())
      result.heldout_curve.emplace_back(step + 1, rm.evaluate(heldout, config.precision));
    if (on_step) on_step(step, m);
  }
  result.train = rm.evaluate(train, config.precision);
  result.heldout = rm.evaluate(heldout, config.precision);
  if (!heldout.empty()) result.heldout_curve.emplace_back(config.steps, result.heldout);
  result.wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return result;
}

}  // namespace moerl
