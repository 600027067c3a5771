#include "runtime/model/model.hpp"

#include <algorithm>
#include <cmath>
#include <random>

#include "kernels/cross_entropy.hpp"
#include "kernels/embedding.hpp"
#include "kernels/rmsnorm.hpp"
#include "runtime/error.hpp"
#include "runtime/model/attention.hpp"
#include "runtime/model/decoder_layer.hpp"
#include "runtime/safetensors.hpp"

namespace moerl {
using Buffer = std::vector<float>;
using Norm = SavedNorm;

// One pre-norm decoder layer (decoder_layer.hpp) with incremental decoding.
struct DecoderLayer : PreNormLayer<DenseFeedForward> {
  std::string mlp_prefix;  // "model.layers.N.mlp"

  DecoderLayer(const ModelConfig& c, Params& p, const std::string& prefix, bool use_moe,
               const RoutedExpertsFactory& routed)
      : PreNormLayer(c, p, prefix), mlp_prefix(prefix + "mlp") {
    if (use_moe)
      moe = std::make_unique<MoeFeedForward>(c, p, mlp_prefix, routed ? routed(mlp_prefix) : nullptr);
    else
      dense = std::make_unique<DenseFeedForward>(p, mlp_prefix, c.hidden_size, c.intermediate_size);
  }

  // Inference: in, out [batch*n_new, dim] with the attention's cache; the feed-forward's saved activations
  // are overwritten (the caller refuses a later backward).
  void decode(const float* in, int64_t batch, int64_t n_new, MlaCache& cache, float* out, Precision precision) {
    const int64_t T = batch * n_new, n = T * dim;
    Buffer xn(static_cast<size_t>(n)), hh(static_cast<size_t>(n)), rs(static_cast<size_t>(T));
    cpu::rmsnorm_forward(in, norm1.weight->value.data<float>(), xn.data(), rs.data(), T, dim, norm1.eps);
    attn.decode(xn.data(), n_new, cache, hh.data(), precision);
    add_into(hh.data(), in, n);
    cpu::rmsnorm_forward(hh.data(), norm2.weight->value.data<float>(), xn.data(), rs.data(), T, dim, norm2.eps);
    if (moe)
      moe->forward(xn.data(), batch, n_new, out, precision, 0.0f);
    else
      dense->forward(xn.data(), T, out, precision);
    add_into(out, hh.data(), n);
  }
};

// DeepSeek-V3 multi-token prediction, depth 1, sharing the embedding and output head with the main model:
//   z_i = eh_proj([enorm(emb(t_{i+1})) ; hnorm(h_i)]),  z'_i = layer(z_i),  logits_i = head(norm(z'_i))
// predicting t_{i+2}. h_i is the main model's last hidden state before its final norm (the depth-0
// representation of the paper). Weights live under model.layers.{num_hidden_layers}. as published.
struct MtpModule {
  Norm enorm, hnorm, final_norm;
  Param* eh_proj;
  DecoderLayer layer;
  int64_t dim;
  Buffer emb, cat, z, zl, zn;  // saved: emb [T, D], cat [T, 2D], z [T, D], zl (layer out) [T, D], zn [T, D]
  std::vector<int64_t> ids, labels;

  MtpModule(const ModelConfig& c, Params& p, const std::string& prefix, const RoutedExpertsFactory& routed)
      : layer(c, p, prefix, c.is_moe_layer(c.num_hidden_layers), routed), dim(c.hidden_size) {
    enorm.weight = &p.add(prefix + "enorm.weight", {c.hidden_size});
    hnorm.weight = &p.add(prefix + "hnorm.weight", {c.hidden_size});
    final_norm.weight = &p.add(prefix + "shared_head.norm.weight", {c.hidden_size});
    eh_proj = &p.add(prefix + "eh_proj.weight", {c.hidden_size, 2 * c.hidden_size});
    enorm.eps = hnorm.eps = final_norm.eps = static_cast<float>(c.rms_norm_eps);
  }
};

LossDenominators loss_denominators(const TokenBatch& b) {
  LossDenominators d;
  d.sequences = b.batch;
  for (int64_t s = 0; s < b.batch; ++s)
    for (int64_t i = 0; i < b.seq; ++i) {
      const int64_t t = s * b.seq + i;
      d.tokens += b.labels[t] >= 0;
      d.mtp_tokens += i + 1 < b.seq && b.labels[t + 1] >= 0;  // the MTP module predicts labels[t + 1] at t
    }
  return d;
}

void LossSums::add(const LossSums& o) {
  loss_sum += o.loss_sum;
  tokens += o.tokens;
  mtp_sum += o.mtp_sum;
  mtp_tokens += o.mtp_tokens;
  balance_loss += o.balance_loss;
}

LossReport LossSums::report(float mtp_weight) const {
  LossReport r;
  r.loss = tokens ? loss_sum / static_cast<double>(tokens) : 0.0;
  r.mtp_loss = mtp_tokens ? mtp_sum / static_cast<double>(mtp_tokens) : 0.0;
  r.balance_loss = balance_loss;
  r.tokens = tokens;
  r.total = r.loss + mtp_weight * r.mtp_loss + r.balance_loss;
  return r;
}

struct ModelPart::Impl {
  ModelConfig config;
  Param* embed = nullptr;  // first part; a last part's copy when the MTP module or a tied head reads it
  Param* head = nullptr;   // last part
  Norm final_norm;         // last part
  std::vector<std::unique_ptr<DecoderLayer>> layers;
  std::unique_ptr<MtpModule> mtp;  // last part, when the config has one

  // Saved by forward for backward.
  bool pending = false;  // a forward whose backward has not run
  ForwardOptions options;
  int64_t batch = 0, seq = 0;
  std::vector<int64_t> ids, labels;
  Buffer hidden;       // [T, D] output of the last decoder layer (input of the final norm)
  Buffer normed;       // [T, D]
  Buffer dlogits;      // [T, V] d total / d logits of the main head
  Buffer dnormed_extra;  // [T, D] added at the final norm's output (backward_from's value-head gradient)
  Buffer mtp_dlogits;  // [T, V] for the MTP head
  Buffer logits;       // [T, V] when kept

  std::vector<MoeFeedForward*> moe_layers() const {
    std::vector<MoeFeedForward*> out;
    for (auto& l : layers)
      if (l->moe) out.push_back(l->moe.get());
    if (mtp && mtp->layer.moe) out.push_back(mtp->layer.moe.get());
    return out;
  }
};

ModelPart::ModelPart(const ModelConfig& c, Params& p, PartSpec spec, const RoutedExpertsFactory& routed)
    : spec_(spec), impl_(std::make_unique<Impl>()) {
  const int64_t L = c.num_hidden_layers;
  if (spec_.layer_end < 0) spec_.layer_end = L;
  std::string range = "[";  // built piecewise: GCC 12 warns (-Wrestrict, falsely) on "[" + std::to_string(...)
  range += std::to_string(spec_.layer_begin) + ", " + std::to_string(spec_.layer_end) + ")";
  require(spec_.layer_begin >= 0 && spec_.layer_begin <= spec_.layer_end && spec_.layer_end <= L,
          "model part: layers " + range + " outside the model's 0 .. " + std::to_string(L));
  require(!spec_.first || spec_.layer_begin == 0, "model part: the first part starts at layer 0, not " + range);
  require(!spec_.last || spec_.layer_end == L, "model part: the last part ends at layer " + std::to_string(L) +
                                                   ", not " + range);
  Impl& m = *impl_;
  m.config = c;
  const bool has_mtp = spec_.last && c.num_nextn_predict_layers > 0;
  if (spec_.first || (spec_.last && (has_mtp || c.tie_word_embeddings)))
    m.embed = &p.add("model.embed_tokens.weight", {c.vocab_size, c.hidden_size});
  for (int64_t l = spec_.layer_begin; l < spec_.layer_end; ++l)
    m.layers.push_back(std::make_unique<DecoderLayer>(c, p, "model.layers." + std::to_string(l) + ".",
                                                      c.is_moe_layer(l), routed));
  if (!spec_.last) return;
  m.final_norm.weight = &p.add("model.norm.weight", {c.hidden_size});
  m.final_norm.eps = static_cast<float>(c.rms_norm_eps);
  m.head = c.tie_word_embeddings ? m.embed : &p.add("lm_head.weight", {c.vocab_size, c.hidden_size});
  if (has_mtp) m.mtp = std::make_unique<MtpModule>(c, p, "model.layers." + std::to_string(L) + ".", routed);
}

ModelPart::~ModelPart() = default;

LossSums ModelPart::forward(const TokenBatch& b, const float* in, float* out, const ForwardOptions& o,
                            const LossDenominators& whole) {
  Impl& m = *impl_;
  const ModelConfig& c = m.config;
  const int64_t T = b.batch * b.seq, D = c.hidden_size, V = c.vocab_size;
  require(b.batch > 0 && b.seq > 0, "forward: empty batch");
  const bool run_mtp = m.mtp && o.mtp_weight > 0;
  const bool reads_ids = spec_.first || run_mtp, reads_labels = spec_.last;
  // Messages are built only on failure: a part that reads no labels may be given none.
  for (int64_t i = 0; i < T && reads_ids; ++i)
    if (b.input_ids[i] < 0 || b.input_ids[i] >= V)
      throw Error("input_ids[" + std::to_string(i) + "] = " + std::to_string(b.input_ids[i]) +
                  " is outside the vocabulary [0, " + std::to_string(V) + ")");
  for (int64_t i = 0; i < T && reads_labels; ++i)
    if (b.labels[i] != kIgnoreLabel && (b.labels[i] < 0 || b.labels[i] >= V))
      throw Error("labels[" + std::to_string(i) + "] = " + std::to_string(b.labels[i]) + " is outside the vocabulary");
  require(whole.sequences >= b.batch, "forward: the whole batch has " + std::to_string(whole.sequences) +
                                          " sequences, fewer than this micro-batch's " + std::to_string(b.batch));
  require(spec_.first || in, "forward: a part after the first needs its input activations");
  require(spec_.last || out, "forward: a part before the last needs somewhere to write its output");
  m.options = o;
  m.batch = b.batch;
  m.seq = b.seq;
  if (reads_ids) m.ids.assign(b.input_ids, b.input_ids + T);
  if (reads_labels) m.labels.assign(b.labels, b.labels + T);
  m.pending = true;

  // The balance loss is a mean over the whole batch's sequences: this micro-batch's share of it.
  ForwardOptions lo = o;
  if (o.balance_alpha > 0)
    lo.balance_alpha = static_cast<float>(o.balance_alpha * (static_cast<double>(b.batch) /
                                                             static_cast<double>(whole.sequences)));
  LossSums r;
  Buffer x(static_cast<size_t>(T * D)), y(static_cast<size_t>(T * D));
  if (spec_.first)
    cpu::embedding_forward(m.embed->value.data<float>(), b.input_ids, T, D, x.data());
  else
    std::copy_n(in, T * D, x.data());
  for (auto& layer : m.layers) {
    r.balance_loss += layer->forward(x.data(), b.batch, b.seq, y.data(), lo);
    std::swap(x, y);
  }
  if (!spec_.last) {
    std::copy_n(x.data(), T * D, out);
    return r;
  }
  m.hidden = std::move(x);
  m.normed.resize(static_cast<size_t>(T * D));
  m.final_norm.forward(m.hidden.data(), T, m.normed.data());

  // Main head. The head stays in FP32 in every recipe (DeepSeek-V3 keeps it in higher precision).
  m.logits.resize(static_cast<size_t>(T * V));
  cpu::linear_forward(Precision::FP32, m.normed.data(), m.head->value.data<float>(), m.logits.data(), T, V, D);
  m.dlogits.resize(o.for_backward ? static_cast<size_t>(T * V) : 0);
  const float scale = whole.tokens ? 1.0f / static_cast<float>(whole.tokens) : 0.0f;
  r.loss_sum = cpu::cross_entropy(m.logits.data(), b.labels, T, V, scale, o.for_backward ? m.dlogits.data() : nullptr,
                                  &r.tokens);

  if (run_mtp) {
    MtpModule& mt = *m.mtp;
    // Position i (sequence s) reads token t_{i+1} and predicts t_{i+2} = labels[i+1].
    mt.ids.resize(static_cast<size_t>(T));
    mt.labels.resize(static_cast<size_t>(T));
    for (int64_t s = 0; s < b.batch; ++s)
      for (int64_t i = 0; i < b.seq; ++i) {
        const int64_t t = s * b.seq + i;
        const bool last = i + 1 == b.seq;
        mt.ids[t] = last ? std::max<int64_t>(b.labels[t], 0) : b.input_ids[t + 1];
        mt.labels[t] = last ? kIgnoreLabel : b.labels[t + 1];
      }
    mt.emb.resize(static_cast<size_t>(T * D));
    mt.cat.resize(static_cast<size_t>(T * 2 * D));
    mt.z.resize(static_cast<size_t>(T * D));
    mt.zl.resize(static_cast<size_t>(T * D));
    mt.zn.resize(static_cast<size_t>(T * D));
    cpu::embedding_forward(m.embed->value.data<float>(), mt.ids.data(), T, D, mt.emb.data());
    Buffer en(static_cast<size_t>(T * D)), hn(static_cast<size_t>(T * D));
    mt.enorm.forward(mt.emb.data(), T, en.data());
    mt.hnorm.forward(m.hidden.data(), T, hn.data());
    for (int64_t t = 0; t < T; ++t) {
      std::copy_n(en.data() + t * D, D, mt.cat.data() + t * 2 * D);
      std::copy_n(hn.data() + t * D, D, mt.cat.data() + t * 2 * D + D);
    }
    cpu::linear_forward(o.precision, mt.cat.data(), mt.eh_proj->value.data<float>(), mt.z.data(), T, D, 2 * D);
    r.balance_loss += mt.layer.forward(mt.z.data(), b.batch, b.seq, mt.zl.data(), lo);
    mt.final_norm.forward(mt.zl.data(), T, mt.zn.data());
    Buffer mlogits(static_cast<size_t>(T * V));
    cpu::linear_forward(Precision::FP32, mt.zn.data(), m.head->value.data<float>(), mlogits.data(), T, V, D);
    m.mtp_dlogits.resize(o.for_backward ? static_cast<size_t>(T * V) : 0);
    const float mscale = whole.mtp_tokens ? o.mtp_weight / static_cast<float>(whole.mtp_tokens) : 0.0f;
    r.mtp_sum = cpu::cross_entropy(mlogits.data(), mt.labels.data(), T, V, mscale,
                                   o.for_backward ? m.mtp_dlogits.data() : nullptr, &r.mtp_tokens);
  }
  if (!o.keep_logits) Buffer().swap(m.logits);
  return r;
}

void ModelPart::backward(const float* dout, float* din) {
  Impl& m = *impl_;
  const ModelConfig& c = m.config;
  const int64_t T = m.batch * m.seq, D = c.hidden_size, V = c.vocab_size;
  require(m.pending, "backward() called without a forward()");
  require(m.options.for_backward, "backward() after a forward() made with for_backward = false");
  require(spec_.last || dout, "backward: a part before the last needs the gradient of its output");
  require(spec_.first || din, "backward: a part after the first needs somewhere to write its input's gradient");
  Buffer dhidden(static_cast<size_t>(T * D));
  if (!spec_.last) std::copy_n(dout, T * D, dhidden.data());
  if (spec_.last) {
    Buffer dnormed(static_cast<size_t>(T * D));
    cpu::linear_backward(Precision::FP32, m.dlogits.data(), m.normed.data(), m.head->value.data<float>(),
                         dnormed.data(), m.head->grad.data<float>(), T, V, D);
    if (!m.dnormed_extra.empty()) {
      add_into(dnormed.data(), m.dnormed_extra.data(), T * D);
      Buffer().swap(m.dnormed_extra);
    }
    m.final_norm.backward(dnormed.data(), m.hidden.data(), T, dhidden.data());
  }

  if (spec_.last && m.mtp && m.options.mtp_weight > 0) {
    MtpModule& mt = *m.mtp;
    Buffer dzn(static_cast<size_t>(T * D)), dzl(static_cast<size_t>(T * D)), dz(static_cast<size_t>(T * D));
    Buffer dcat(static_cast<size_t>(T * 2 * D)), den(static_cast<size_t>(T * D)), dhn(static_cast<size_t>(T * D));
    Buffer tmp(static_cast<size_t>(T * D));
    cpu::linear_backward(Precision::FP32, m.mtp_dlogits.data(), mt.zn.data(), m.head->value.data<float>(), dzn.data(),
                         m.head->grad.data<float>(), T, V, D);
    mt.final_norm.backward(dzn.data(), mt.zl.data(), T, dzl.data());
    mt.layer.backward(dzl.data(), dz.data());
    cpu::linear_backward(m.options.precision, dz.data(), mt.cat.data(), mt.eh_proj->value.data<float>(), dcat.data(),
                         mt.eh_proj->grad.data<float>(), T, D, 2 * D);
    for (int64_t t = 0; t < T; ++t) {
      std::copy_n(dcat.data() + t * 2 * D, D, den.data() + t * D);
      std::copy_n(dcat.data() + t * 2 * D + D, D, dhn.data() + t * D);
    }
    mt.hnorm.backward(dhn.data(), m.hidden.data(), T, tmp.data());
    add_into(dhidden.data(), tmp.data(), T * D);
    mt.enorm.backward(den.data(), mt.emb.data(), T, tmp.data());
    cpu::embedding_backward(tmp.data(), mt.ids.data(), T, D, m.embed->grad.data<float>());
  }

  Buffer dx(static_cast<size_t>(T * D));
  for (auto it = m.layers.rbegin(); it != m.layers.rend(); ++it) {
    (*it)->backward(dhidden.data(), dx.data());
    std::swap(dhidden, dx);
  }
  if (spec_.first)
    cpu::embedding_backward(dhidden.data(), m.ids.data(), T, D, m.embed->grad.data<float>());
  else
    std::copy_n(dhidden.data(), T * D, din);
  m.pending = false;  // one backward per forward
}

const float* ModelPart::logits() const {
  require(!impl_->logits.empty(), "logits() needs a forward pass with keep_logits");
  return impl_->logits.data();
}

const float* ModelPart::final_hidden() const {
  require(spec_.last && !impl_->normed.empty(), "final_hidden() needs a forward pass of the last part");
  return impl_->normed.data();
}

void ModelPart::backward_from(const float* dlogits, const float* dfinal_hidden, float* din) {
  Impl& m = *impl_;
  require(spec_.last, "backward_from: only the last part has logits");
  require(m.pending && m.options.for_backward, "backward_from() needs a forward() made with for_backward");
  require(!(m.mtp && m.options.mtp_weight > 0), "backward_from(): the forward ran the MTP module (mtp_weight > 0)");
  const int64_t T = m.batch * m.seq;
  m.dlogits.assign(dlogits, dlogits + T * m.config.vocab_size);
  if (dfinal_hidden) m.dnormed_extra.assign(dfinal_hidden, dfinal_hidden + T * m.config.hidden_size);
  backward(nullptr, din);
}

KvCache ModelPart::new_cache(int64_t batch, int64_t capacity) const {
  const Impl& m = *impl_;
  require(spec_.first && spec_.last, "new_cache: decoding needs the whole model in one part");
  require(capacity <= m.config.max_position_embeddings,
          "new_cache: capacity " + std::to_string(capacity) + " exceeds max_position_embeddings = " +
              std::to_string(m.config.max_position_embeddings));
  KvCache c;
  c.batch = batch;
  c.capacity = capacity;
  for (auto& layer : m.layers) c.layers.push_back(layer->attn.new_cache(batch, capacity));
  return c;
}

void ModelPart::decode(const int64_t* ids, int64_t n_new, KvCache& cache, float* logits, Precision precision) {
  Impl& m = *impl_;
  const ModelConfig& c = m.config;
  const int64_t B = cache.batch, T = B * n_new, D = c.hidden_size, V = c.vocab_size;
  require(spec_.first && spec_.last, "decode: decoding needs the whole model in one part");
  require(cache.layers.size() == m.layers.size(), "decode: the cache has " + std::to_string(cache.layers.size()) +
                                                      " layers, the model " + std::to_string(m.layers.size()));
  require(n_new > 0 && cache.length + n_new <= cache.capacity,
          "decode: " + std::to_string(n_new) + " new tokens after " + std::to_string(cache.length) +
              " do not fit a cache of " + std::to_string(cache.capacity) + " positions");
  for (int64_t i = 0; i < T; ++i)
    require(ids[i] >= 0 && ids[i] < V, "decode: ids[" + std::to_string(i) + "] = " + std::to_string(ids[i]) +
                                           " is outside the vocabulary [0, " + std::to_string(V) + ")");
  m.pending = false;  // the layers' saved activations are about to be overwritten
  Buffer x(static_cast<size_t>(T * D)), y(static_cast<size_t>(T * D)), rs(static_cast<size_t>(T));
  cpu::embedding_forward(m.embed->value.data<float>(), ids, T, D, x.data());
  for (size_t l = 0; l < m.layers.size(); ++l) {
    m.layers[l]->decode(x.data(), B, n_new, cache.layers[l], y.data(), precision);
    std::swap(x, y);
  }
  cpu::rmsnorm_forward(x.data(), m.final_norm.weight->value.data<float>(), y.data(), rs.data(), T, D,
                       m.final_norm.eps);
  cpu::linear_forward(Precision::FP32, y.data(), m.head->value.data<float>(), logits, T, V, D);
  cache.length += n_new;
}

std::vector<std::string> ModelPart::moe_prefixes() const {
  std::vector<std::string> out;
  for (auto& l : impl_->layers)
    if (l->moe) out.push_back(l->mlp_prefix);
  if (impl_->mtp && impl_->mtp->layer.moe) out.push_back(impl_->mtp->layer.mlp_prefix);
  return out;
}

std::vector<ExpertLoad> ModelPart::expert_loads() const {
  std::vector<ExpertLoad> out;
  for (MoeFeedForward* moe : impl_->moe_layers()) out.push_back(moe->load());
  return out;
}

void ModelPart::update_router_bias(float gamma) {
  for (MoeFeedForward* moe : impl_->moe_layers()) moe->update_bias(gamma);
}

void ModelPart::update_router_bias(float gamma, const std::vector<ExpertLoad>& loads) {
  const std::vector<MoeFeedForward*> moes = impl_->moe_layers();
  require(loads.size() == moes.size(), "update_router_bias: " + std::to_string(loads.size()) + " loads for " +
                                           std::to_string(moes.size()) + " MoE layers");
  for (size_t i = 0; i < moes.size(); ++i) moes[i]->update_bias(gamma, loads[i]);
}

// ---------------------------------------------------------------------------------------------------------------
// Model: one part holding everything.

Model::Model(ModelConfig config) : config_(std::move(config)) {
  config_.validate("model config");
  part_ = std::make_unique<ModelPart>(config_, params_, PartSpec{});
}

Model::~Model() = default;

void Model::init_random(uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, static_cast<float>(config_.initializer_range));
  for (auto& [name, p] : params_.all()) {  // name order: independent of construction order
    float* v = p.value.data<float>();
    const bool is_norm = name.find("norm.weight") != std::string::npos;
    const bool is_bias = name.find("e_score_correction_bias") != std::string::npos;
    for (int64_t i = 0; i < p.value.numel(); ++i) v[i] = is_norm ? 1.0f : is_bias ? 0.0f : normal(rng);
  }
}

void Model::load_weights(const SafeTensors& st) {
  for (auto& [name, p] : params_.all()) {
    auto it = st.tensors.find(name);
    require(it != st.tensors.end(), st.source + ": missing tensor " + name + " (shape " +
                                        shape_string(p.value.shape()) + ")");
    require(it->second.shape() == p.value.shape(), st.source + ": tensor " + name + " has shape " +
                                                       shape_string(it->second.shape()) + ", the config expects " +
                                                       shape_string(p.value.shape()));
    require(it->second.dtype() == DType::F32 || it->second.dtype() == DType::BF16 || it->second.dtype() == DType::F16,
            st.source + ": tensor " + name + " has dtype " + std::string(dtype_name(it->second.dtype())) +
                ", expected F32, BF16 or F16");
    p.value = it->second.to(DType::F32);
  }
  const std::string mtp_prefix = "model.layers." + std::to_string(config_.num_hidden_layers) + ".";
  for (auto& [name, t] : st.tensors) {
    if (params_.contains(name)) continue;
    // The published checkpoints repeat the shared embedding and head inside the MTP layer.
    if (name == mtp_prefix + "embed_tokens.weight" || name == mtp_prefix + "shared_head.head.weight") continue;
    require(false, st.source + ": unexpected tensor " + name + " (not part of the model the config describes)");
  }
}

LossReport Model::forward(const TokenBatch& b, const ForwardOptions& o) {
  require(b.batch > 0 && b.seq > 0, "forward: empty batch");
  return part_->forward(b, nullptr, nullptr, o, loss_denominators(b)).report(o.mtp_weight);
}

void Model::backward() { part_->backward(nullptr, nullptr); }

const float* Model::logits() const { return part_->logits(); }

const float* Model::final_hidden() const { return part_->final_hidden(); }

void Model::backward_from(const float* dlogits, const float* dfinal_hidden) {
  part_->backward_from(dlogits, dfinal_hidden, nullptr);
}

KvCache Model::new_cache(int64_t batch, int64_t capacity) const { return part_->new_cache(batch, capacity); }

void Model::decode(const int64_t* ids, int64_t n_new, KvCache& cache, float* logits, Precision precision) {
  part_->decode(ids, n_new, cache, logits, precision);
}

void Model::update_router_bias(float gamma) { part_->update_router_bias(gamma); }

std::vector<ExpertLoad> Model::expert_loads() const { return part_->expert_loads(); }

}  // namespace moerl
