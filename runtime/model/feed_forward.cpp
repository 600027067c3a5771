#include "runtime/model/feed_forward.hpp"

#include <algorithm>
#include <cstring>

#include "kernels/half.hpp"
#include "kernels/moe_permute.hpp"
#include "kernels/router.hpp"
#include "kernels/swiglu.hpp"
#include "runtime/error.hpp"

namespace moerl {

namespace {

// The weights of one SwiGLU MLP, down(silu(gate(x)) * up(x)): gate, up [I, H], down [H, I].
struct SwigluWeights {
  Param* gate = nullptr;
  Param* up = nullptr;
  Param* down = nullptr;
};

SwigluWeights add_swiglu(Params& params, const std::string& prefix, int64_t hidden, int64_t inter) {
  SwigluWeights w;
  w.gate = &params.add(prefix + ".gate_proj.weight", {inter, hidden});
  w.up = &params.add(prefix + ".up_proj.weight", {inter, hidden});
  w.down = &params.add(prefix + ".down_proj.weight", {hidden, inter});
  return w;
}

// Grows a scratch buffer to at least n floats (never shrinks: buffers are reused across steps).
float* at_least(std::vector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}

// The FP8 recipe's GEMM outputs that feed SwiGLU (g and u) and its gradient (dh) are BF16 values, as DeepSeek-V3's
// FP8 GEMMs output BF16 (the GPU holds them so: kernels/cuda/moe_fp8.hpp, MoeFp8Experts::gate_up_bf16).
void round_if_fp8(Precision p, float* x, int64_t n) {
  if (p == Precision::FP8)
    for (int64_t i = 0; i < n; ++i) x[i] = round_bf16(x[i]);
}

// One SwiGLU MLP over n rows: x [n, H] -> y [n, H] (overwritten); g, u, h [n, I] kept for backward.
void swiglu_mlp_forward(Precision p, const SwigluWeights& w, const float* x, int64_t n, int64_t H, int64_t I,
                        float* g, float* u, float* h, float* y) {
  cpu::linear_forward(p, x, w.gate->value.data<float>(), g, n, I, H);
  cpu::linear_forward(p, x, w.up->value.data<float>(), u, n, I, H);
  round_if_fp8(p, g, n * I);
  round_if_fp8(p, u, n * I);
  cpu::swiglu_forward(g, u, h, n * I);
  cpu::linear_forward(p, h, w.down->value.data<float>(), y, n, H, I);
}

// Scratch of swiglu_mlp_backward, sized for the largest call.
struct SwigluScratch {
  std::vector<float> dh, dg, du, dx_up;
};

// Backward of swiglu_mlp_forward: dx [n, H] overwritten, weight gradients accumulated.
void swiglu_mlp_backward(Precision p, const SwigluWeights& w, const float* dy, const float* x, const float* g,
                         const float* u, const float* h, int64_t n, int64_t H, int64_t I, float* dx,
                         SwigluScratch& s) {
  float* dh = at_least(s.dh, n * I);
  float* dg = at_least(s.dg, n * I);
  float* du = at_least(s.du, n * I);
  float* dx_up = at_least(s.dx_up, n * H);
  cpu::linear_backward(p, dy, h, w.down->value.data<float>(), dh, w.down->grad.data<float>(), n, H, I);
  round_if_fp8(p, dh, n * I);
  cpu::swiglu_backward(dh, g, u, dg, du, n * I);
  cpu::linear_backward(p, dg, x, w.gate->value.data<float>(), dx, w.gate->grad.data<float>(), n, I, H);
  cpu::linear_backward(p, du, x, w.up->value.data<float>(), dx_up, w.up->grad.data<float>(), n, I, H);
  for (int64_t i = 0; i < n * H; ++i) dx[i] += dx_up[i];
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// DenseFeedForward

struct DenseFeedForward::Impl {
  SwigluWeights w;
  int64_t hidden = 0, inter = 0;
  // Saved by forward: its precision, x [T, H], g, u, h [T, I].
  Precision precision = Precision::FP32;
  int64_t tokens = 0;
  std::vector<float> x, g, u, h;
  SwigluScratch scratch;
};

DenseFeedForward::DenseFeedForward(Params& params, const std::string& prefix, int64_t hidden, int64_t intermediate)
    : impl_(std::make_shared<Impl>()) {
  require(hidden > 0 && intermediate > 0, prefix + ": dense feed-forward needs hidden_size > 0 and "
                                                   "intermediate_size > 0, got " + std::to_string(hidden) + " and " +
                                                   std::to_string(intermediate));
  impl_->w = add_swiglu(params, prefix, hidden, intermediate);
  impl_->hidden = hidden;
  impl_->inter = intermediate;
}

void DenseFeedForward::forward(const float* x, int64_t tokens, float* y, Precision precision) {
  Impl& m = *impl_;
  require(tokens >= 0, "DenseFeedForward::forward: negative token count");
  const int64_t H = m.hidden, I = m.inter;
  m.precision = precision;
  m.tokens = tokens;
  m.x.assign(x, x + tokens * H);
  x = m.x.data();  // reads from the saved copy, so y may alias x
  m.g.resize(tokens * I);
  m.u.resize(tokens * I);
  m.h.resize(tokens * I);
  if (tokens == 0) return;
  swiglu_mlp_forward(precision, m.w, x, tokens, H, I, m.g.data(), m.u.data(), m.h.data(), y);
}

void DenseFeedForward::backward(const float* dy, float* dx) {
  Impl& m = *impl_;
  if (m.tokens == 0) return;
  swiglu_mlp_backward(m.precision, m.w, dy, m.x.data(), m.g.data(), m.u.data(), m.h.data(), m.tokens, m.hidden,
                      m.inter, dx, m.scratch);
}

// ---------------------------------------------------------------------------------------------------------------
// ExpertGroup

struct ExpertGroup::Impl {
  std::vector<int64_t> ids;            // the experts, ascending
  std::vector<SwigluWeights> experts;  // [ids.size()]
  int64_t hidden = 0, inter = 0;
  // Saved: rows per expert, the input rows xp [R, H] and g, u, h [R, I] of the last forward.
  Precision precision = Precision::FP32;
  std::vector<int64_t> counts;
  int64_t rows = 0;
  std::vector<float> xp, gp, up, hp;
  SwigluScratch scratch;
};

ExpertGroup::ExpertGroup(Params& params, const std::string& prefix, std::vector<int64_t> experts, int64_t hidden,
                         int64_t intermediate)
    : impl_(std::make_shared<Impl>()) {
  require(hidden > 0 && intermediate > 0, prefix + ": expert group needs hidden_size > 0 and "
                                                   "moe_intermediate_size > 0");
  for (size_t i = 0; i < experts.size(); ++i)
    require(experts[i] >= 0 && (i == 0 || experts[i] > experts[i - 1]),
            prefix + ": expert ids of a group must be ascending and distinct, got " + std::to_string(experts[i]) +
                " at position " + std::to_string(i));
  Impl& m = *impl_;
  m.ids = std::move(experts);
  m.hidden = hidden;
  m.inter = intermediate;
  for (int64_t e : m.ids) m.experts.push_back(add_swiglu(params, prefix + ".experts." + std::to_string(e), hidden,
                                                         intermediate));
  m.counts.assign(m.ids.size(), 0);
}

const std::vector<int64_t>& ExpertGroup::experts() const { return impl_->ids; }
int64_t ExpertGroup::hidden() const { return impl_->hidden; }
int64_t ExpertGroup::rows() const { return impl_->rows; }

float* ExpertGroup::prepare(const int64_t* counts) {
  Impl& m = *impl_;
  m.rows = 0;
  for (size_t i = 0; i < m.ids.size(); ++i) {
    require(counts[i] >= 0, "expert group: negative row count " + std::to_string(counts[i]) + " for expert " +
                                std::to_string(m.ids[i]));
    m.counts[i] = counts[i];
    m.rows += counts[i];
  }
  m.xp.resize(static_cast<size_t>(m.rows * m.hidden));
  return m.xp.data();
}

void ExpertGroup::forward(float* yp, Precision precision) {
  Impl& m = *impl_;
  const int64_t H = m.hidden, I = m.inter, R = m.rows;
  m.precision = precision;
  m.gp.resize(static_cast<size_t>(R * I));
  m.up.resize(static_cast<size_t>(R * I));
  m.hp.resize(static_cast<size_t>(R * I));
  // TODO(perf): one grouped GEMM over all experts (the GPU path); here each GEMM gets BLAS's threads.
  int64_t r0 = 0;
  for (size_t i = 0; i < m.ids.size(); ++i) {
    const int64_t n = m.counts[i];
    if (n > 0)
      swiglu_mlp_forward(precision, m.experts[i], m.xp.data() + r0 * H, n, H, I, m.gp.data() + r0 * I,
                         m.up.data() + r0 * I, m.hp.data() + r0 * I, yp + r0 * H);
    r0 += n;
  }
}

void ExpertGroup::backward(const float* dyp, float* dxp) {
  Impl& m = *impl_;
  const int64_t H = m.hidden, I = m.inter;
  int64_t r0 = 0;
  for (size_t i = 0; i < m.ids.size(); ++i) {
    const int64_t n = m.counts[i];
    if (n > 0)
      swiglu_mlp_backward(m.precision, m.experts[i], dyp + r0 * H, m.xp.data() + r0 * H, m.gp.data() + r0 * I,
                          m.up.data() + r0 * I, m.hp.data() + r0 * I, n, H, I, dxp + r0 * H, m.scratch);
    r0 += n;
  }
}

namespace {

// Every routed expert of a layer, computed in place: the single model's RoutedExperts.
class LocalExperts final : public RoutedExperts {
 public:
  LocalExperts(Params& params, const std::string& prefix, int64_t n_experts, int64_t hidden, int64_t inter)
      : group_(params, prefix, all_experts(n_experts), hidden, inter), counts_(static_cast<size_t>(n_experts)) {}
  float* input(const int64_t* offsets) override {
    for (size_t e = 0; e < counts_.size(); ++e) counts_[e] = offsets[e + 1] - offsets[e];
    return group_.prepare(counts_.data());
  }
  void forward(float* yp, Precision precision) override { group_.forward(yp, precision); }
  void backward(const float* dyp, float* dxp) override { group_.backward(dyp, dxp); }

 private:
  static std::vector<int64_t> all_experts(int64_t n) {
    std::vector<int64_t> ids(static_cast<size_t>(n));
    for (int64_t e = 0; e < n; ++e) ids[static_cast<size_t>(e)] = e;
    return ids;
  }
  ExpertGroup group_;
  std::vector<int64_t> counts_;
};

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// MoeFeedForward

struct MoeFeedForward::Impl {
  cpu::RouterSpec spec;
  int64_t hidden = 0, inter = 0, shared_inter = 0;  // H, I (per routed expert), I_s = n_shared · I
  Param* router = nullptr;                           // gate.weight [E, H]
  Param* bias = nullptr;                             // gate.e_score_correction_bias [E], a buffer
  std::unique_ptr<RoutedExperts> routed;             // the E routed experts, here or on expert shards
  SwigluWeights shared;                              // absent when n_shared_experts == 0

  // Saved by forward (T = batch · seq tokens, R = T · K routed rows in expert-major order).
  Precision precision = Precision::FP32;
  int64_t batch = 0, seq = 0;
  float balance_alpha = 0;
  std::vector<float> x;                       // [T, H]
  std::vector<float> scores;                  // [T, E], sigmoid of the router logits
  std::vector<int32_t> topk_idx;              // [T, K]
  std::vector<float> topk_weight;             // [T, K]
  std::vector<int64_t> offsets;               // [E + 1], see kernels/moe_permute.hpp
  std::vector<int64_t> token_of, row_of;      // [R]
  std::vector<float> yp;                      // [R, H] routed expert outputs (combine's backward reads them)
  std::vector<float> sg, su, sh;              // shared expert g, u, h [T, I_s]
  ExpertLoad load;

  // Backward scratch.
  std::vector<float> dyp, dxp, dweight, dscores, dlogits;
  SwigluScratch scratch;

  int64_t tokens() const { return batch * seq; }
};

MoeFeedForward::MoeFeedForward(const ModelConfig& config, Params& params, const std::string& prefix,
                               std::unique_ptr<RoutedExperts> routed)
    : impl_(std::make_shared<Impl>()) {
  const int64_t E = config.n_routed_experts, G = config.n_group;
  auto field = [&](const char* name, int64_t value, const std::string& expected) {
    return prefix + ": config field " + name + " = " + std::to_string(value) + ", expected " + expected;
  };
  require(config.hidden_size > 0, field("hidden_size", config.hidden_size, "> 0"));
  require(config.moe_intermediate_size > 0, field("moe_intermediate_size", config.moe_intermediate_size, "> 0"));
  require(E > 0, field("n_routed_experts", E, "> 0 in an MoE layer"));
  require(G > 0 && E % G == 0, field("n_group", G, "a divisor of n_routed_experts = " + std::to_string(E)));
  require(config.topk_group >= 1 && config.topk_group <= G,
          field("topk_group", config.topk_group, "1 .. n_group = " + std::to_string(G)));
  const int64_t kept = config.topk_group * (E / G);
  require(config.num_experts_per_tok >= 1 && config.num_experts_per_tok <= kept,
          field("num_experts_per_tok", config.num_experts_per_tok,
                "1 .. topk_group · n_routed_experts / n_group = " + std::to_string(kept)));
  require(config.n_shared_experts >= 0, field("n_shared_experts", config.n_shared_experts, ">= 0"));

  Impl& m = *impl_;
  m.spec.n_experts = E;
  m.spec.top_k = config.num_experts_per_tok;
  m.spec.n_group = G;
  m.spec.topk_group = config.topk_group;
  m.spec.norm_topk_prob = config.norm_topk_prob;
  m.spec.routed_scaling_factor = static_cast<float>(config.routed_scaling_factor);
  m.hidden = config.hidden_size;
  m.inter = config.moe_intermediate_size;
  m.shared_inter = config.n_shared_experts * config.moe_intermediate_size;
  m.router = &params.add(prefix + ".gate.weight", {E, m.hidden});
  m.bias = &params.add(prefix + ".gate.e_score_correction_bias", {E}, /*trainable=*/false);
  m.routed = routed ? std::move(routed) : std::make_unique<LocalExperts>(params, prefix, E, m.hidden, m.inter);
  if (m.shared_inter > 0) m.shared = add_swiglu(params, prefix + ".shared_experts", m.hidden, m.shared_inter);
  m.load.tokens_per_expert.assign(E, 0);
}

float MoeFeedForward::forward(const float* x, int64_t batch, int64_t seq, float* y, Precision precision,
                              float balance_alpha) {
  Impl& m = *impl_;
  require(batch >= 0 && seq >= 0, "MoeFeedForward::forward: batch and seq must be >= 0, got " +
                                      std::to_string(batch) + " and " + std::to_string(seq));
  const int64_t T = batch * seq, H = m.hidden, Is = m.shared_inter;
  const int64_t E = m.spec.n_experts, K = m.spec.top_k, R = T * K;
  m.precision = precision;
  m.batch = batch;
  m.seq = seq;
  m.balance_alpha = balance_alpha;
  m.x.assign(x, x + T * H);
  x = m.x.data();  // reads from the saved copy, so y may alias x
  std::fill(m.load.tokens_per_expert.begin(), m.load.tokens_per_expert.end(), 0);
  m.load.tokens = T;
  if (T == 0) return 0.0f;

  // Router, in FP32 whatever the precision of the experts.
  m.scores.resize(T * E);
  m.topk_idx.resize(T * K);
  m.topk_weight.resize(T * K);
  cpu::linear_forward(Precision::FP32, x, m.router->value.data<float>(), m.scores.data(), T, E, H);
  cpu::router_forward(m.spec, m.scores.data(), m.bias->value.data<float>(), T, m.scores.data(), m.topk_idx.data(),
                      m.topk_weight.data());

  // Shared experts write y; routed experts add to it.
  if (Is > 0) {
    m.sg.resize(T * Is);
    m.su.resize(T * Is);
    m.sh.resize(T * Is);
    swiglu_mlp_forward(precision, m.shared, x, T, H, Is, m.sg.data(), m.su.data(), m.sh.data(), y);
  } else {
    std::fill(y, y + T * H, 0.0f);
  }

  // Routed experts: permute tokens into one contiguous block per expert, the experts' SwiGLU, combine.
  m.offsets.resize(E + 1);
  m.token_of.resize(R);
  m.row_of.resize(R);
  cpu::moe_permute_plan(m.topk_idx.data(), T, K, E, m.offsets.data(), m.token_of.data(), m.row_of.data());
  for (int64_t e = 0; e < E; ++e) m.load.tokens_per_expert[e] = m.offsets[e + 1] - m.offsets[e];
  cpu::moe_gather(x, m.token_of.data(), R, H, m.routed->input(m.offsets.data()));
  m.yp.resize(R * H);
  m.routed->forward(m.yp.data(), precision);
  cpu::moe_combine(m.yp.data(), m.topk_weight.data(), m.row_of.data(), T, K, H, y);

  if (balance_alpha <= 0) return 0.0f;
  return cpu::router_balance_loss(m.spec, m.scores.data(), m.topk_idx.data(), batch, seq, balance_alpha, nullptr);
}

void MoeFeedForward::backward(const float* dy, float* dx) {
  Impl& m = *impl_;
  const int64_t T = m.tokens(), H = m.hidden, Is = m.shared_inter;
  const int64_t E = m.spec.n_experts, K = m.spec.top_k, R = T * K;
  const Precision p = m.precision;
  if (T == 0) return;

  if (Is > 0)
    swiglu_mlp_backward(p, m.shared, dy, m.x.data(), m.sg.data(), m.su.data(), m.sh.data(), T, H, Is, dx, m.scratch);
  else
    std::fill(dx, dx + T * H, 0.0f);

  // Routed experts: dy -> per-row dy · w (and dL/dw), expert blocks backward, rows summed back into their tokens.
  float* dyp = at_least(m.dyp, R * H);
  float* dxp = at_least(m.dxp, R * H);
  float* dweight = at_least(m.dweight, T * K);
  cpu::moe_combine_backward(dy, m.yp.data(), m.topk_weight.data(), m.row_of.data(), T, K, H, dyp, dweight);
  m.routed->backward(dyp, dxp);
  cpu::moe_scatter_add(dxp, m.row_of.data(), T, K, H, dx);

  // Router (FP32): gating weights and balance loss -> scores -> logits -> x and gate.weight.
  const float* dscores = nullptr;
  if (m.balance_alpha > 0) {
    float* ds = at_least(m.dscores, T * E);
    std::fill(ds, ds + T * E, 0.0f);
    cpu::router_balance_loss(m.spec, m.scores.data(), m.topk_idx.data(), m.batch, m.seq, m.balance_alpha, ds);
    dscores = ds;
  }
  float* dlogits = at_least(m.dlogits, T * E);
  cpu::router_backward(m.spec, m.scores.data(), m.topk_idx.data(), dweight, dscores, T, dlogits);
  cpu::sgemm(false, false, T, H, E, 1.0f, dlogits, E, m.router->value.data<float>(), H, 1.0f, dx, H);
  cpu::linear_backward(Precision::FP32, dlogits, m.x.data(), m.router->value.data<float>(), nullptr,
                       m.router->grad.data<float>(), T, E, H);
}

const ExpertLoad& MoeFeedForward::load() const { return impl_->load; }

void MoeFeedForward::update_bias(float gamma) { update_bias(gamma, impl_->load); }

void MoeFeedForward::update_bias(float gamma, const ExpertLoad& expert_load) {
  const Impl& m = *impl_;
  const auto& load = expert_load.tokens_per_expert;
  const int64_t E = m.spec.n_experts;
  require(static_cast<int64_t>(load.size()) == E, "MoeFeedForward::update_bias: a load of " +
                                                      std::to_string(load.size()) + " experts for a layer of " +
                                                      std::to_string(E));
  // Before any forward every load is 0, so nothing moves.
  int64_t total = 0;
  for (int64_t n : load) total += n;
  float* bias = m.bias->value.data<float>();
  for (int64_t e = 0; e < E; ++e) {
    // sign(total / E - load_e), compared exactly in integers.
    const int64_t diff = total - E * load[e];
    bias[e] += gamma * static_cast<float>((diff > 0) - (diff < 0));
  }
}

}  // namespace moerl
