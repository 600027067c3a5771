#include "runtime/parallel/tp_model.hpp"

#include <algorithm>

#include "kernels/cross_entropy.hpp"
#include "kernels/embedding.hpp"
#include "kernels/rmsnorm.hpp"
#include "runtime/error.hpp"
#include "runtime/model/attention.hpp"
#include "runtime/model/decoder_layer.hpp"
#include "runtime/model/feed_forward.hpp"
#include "runtime/parallel/tp_feed_forward.hpp"

namespace moerl {
namespace {

using Buffer = std::vector<float>;
using Norm = SavedNorm;

// One pre-norm decoder layer (decoder_layer.hpp) with this rank's slice of the attention heads and of the dense
// FFN's columns, and a replicated MoE FFN.
struct TpLayer : PreNormLayer<TpDenseFeedForward> {
  TpLayer(const ModelConfig& c, Params& p, const std::string& prefix, bool use_moe, const TensorSlice& slice)
      : PreNormLayer(c, p, prefix, slice) {
    if (use_moe)
      moe = std::make_unique<MoeFeedForward>(c, p, prefix + "mlp");
    else
      dense = std::make_unique<TpDenseFeedForward>(p, prefix + "mlp", c.hidden_size, c.intermediate_size, slice);
  }
};

}  // namespace

struct TensorParallelModel::Impl {
  Param* embed = nullptr;
  Param* head = nullptr;
  Norm final_norm;
  std::vector<std::unique_ptr<TpLayer>> layers;

  ForwardOptions options;
  int64_t batch = 0, seq = 0;
  std::vector<int64_t> ids;
  Buffer hidden, normed, dlogits;  // [T, D], [T, D], [T, V]
};

TensorParallelModel::TensorParallelModel(ModelConfig config, Collectives& tp)
    : config_(std::move(config)), tp_(tp), impl_(std::make_unique<Impl>()) {
  config_.validate("model config");
  const ModelConfig& c = config_;
  const int T = tp.size(), r = tp.rank();
  const std::string where = "tensor parallelism over " + std::to_string(T) + " ranks: ";
  require(c.num_nextn_predict_layers == 0, where + "multi-token prediction is not supported yet "
                                                   "(num_nextn_predict_layers must be 0)");
  require(c.num_attention_heads % T == 0, where + "num_attention_heads " + std::to_string(c.num_attention_heads) +
                                              " does not divide evenly");
  TensorSlice slice{r, T, [group = &tp](float* data, int64_t n) { group->allreduce_sum(data, static_cast<size_t>(n)); }};

  impl_->embed = &params_.add("model.embed_tokens.weight", {c.vocab_size, c.hidden_size});
  const int64_t heads = c.num_attention_heads / T, dq = c.qk_head_dim(), dkv = c.qk_nope_head_dim + c.v_head_dim;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string prefix = "model.layers." + std::to_string(l) + ".";
    const bool moe = c.is_moe_layer(l);
    if (!moe)
      require(c.intermediate_size % T == 0, where + "intermediate_size " + std::to_string(c.intermediate_size) +
                                                " does not divide evenly");
    impl_->layers.push_back(std::make_unique<TpLayer>(c, params_, prefix, moe, slice));
    const std::string a = prefix + "self_attn.";
    shards_[a + (c.q_lora_rank > 0 ? "q_b_proj.weight" : "q_proj.weight")] = {0, r * heads * dq, heads * dq,
                                                                                c.num_attention_heads * dq};
    shards_[a + "kv_b_proj.weight"] = {0, r * heads * dkv, heads * dkv, c.num_attention_heads * dkv};
    shards_[a + "o_proj.weight"] = {1, r * heads * c.v_head_dim, heads * c.v_head_dim,
                                    c.num_attention_heads * c.v_head_dim};
    if (!moe) {
      const int64_t I = c.intermediate_size / T;
      shards_[prefix + "mlp.gate_proj.weight"] = {0, r * I, I, c.intermediate_size};
      shards_[prefix + "mlp.up_proj.weight"] = {0, r * I, I, c.intermediate_size};
      shards_[prefix + "mlp.down_proj.weight"] = {1, r * I, I, c.intermediate_size};
    }
  }
  impl_->final_norm.weight = &params_.add("model.norm.weight", {c.hidden_size});
  impl_->final_norm.eps = static_cast<float>(c.rms_norm_eps);
  impl_->head = c.tie_word_embeddings ? impl_->embed : &params_.add("lm_head.weight", {c.vocab_size, c.hidden_size});
  for (const auto& [name, spec] : shards_) require(params_.contains(name), "tensor parallelism: no parameter " + name);
}

TensorParallelModel::~TensorParallelModel() = default;

ShardSpec TensorParallelModel::shard(const std::string& name) const {
  auto it = shards_.find(name);
  return it == shards_.end() ? ShardSpec{} : it->second;
}

namespace {

// Copies the block `spec` of a whole [rows, cols] matrix to the rank's slice (to_slice) or back.
void copy_block(const ShardSpec& spec, const Shape& whole_shape, const float* src, float* dst, bool to_slice) {
  const int64_t rows = whole_shape[0], cols = whole_shape[1];
  if (spec.axis == 0) {  // rows [begin, begin + count): one contiguous block either way
    const int64_t offset = spec.begin * cols;
    std::copy_n(src + (to_slice ? offset : 0), spec.count * cols, dst + (to_slice ? 0 : offset));
    return;
  }
  for (int64_t i = 0; i < rows; ++i) {  // columns [begin, begin + count) of every row
    const int64_t whole_at = i * cols + spec.begin, slice_at = i * spec.count;
    std::copy_n(src + (to_slice ? whole_at : slice_at), spec.count, dst + (to_slice ? slice_at : whole_at));
  }
}

// Checks that `whole` has the shape the rank's parameter `name` is a slice (or copy) of.
void check_whole(const std::string& name, const ShardSpec& spec, const Param& mine, const Param& whole) {
  Shape expected = mine.value.shape();
  if (spec.axis >= 0) expected[static_cast<size_t>(spec.axis)] = spec.full;
  require(whole.value.shape() == expected && whole.value.dtype() == DType::F32,
          "tensor parallelism: the whole model's " + name + " is " + shape_string(whole.value.shape()) +
              ", expected F32 " + shape_string(expected));
}

}  // namespace

void TensorParallelModel::load_from(const Params& full) {
  for (auto& [name, p] : params_.all()) {
    const Param& whole = full.at(name);
    const ShardSpec spec = shard(name);
    check_whole(name, spec, p, whole);
    if (spec.axis < 0)
      std::copy_n(whole.value.data<float>(), p.value.numel(), p.value.data<float>());
    else
      copy_block(spec, whole.value.shape(), whole.value.data<float>(), p.value.data<float>(), true);
  }
}

void TensorParallelModel::store_into(Params& full) const {
  for (const auto& [name, p] : params_.all()) {
    Param& whole = full.at(name);
    const ShardSpec spec = shard(name);
    check_whole(name, spec, p, whole);
    if (spec.axis < 0)
      std::copy_n(p.value.data<float>(), p.value.numel(), whole.value.data<float>());
    else
      copy_block(spec, whole.value.shape(), p.value.data<float>(), whole.value.data<float>(), false);
  }
}

LossReport TensorParallelModel::forward(const TokenBatch& b, const ForwardOptions& o) {
  Impl& m = *impl_;
  const ModelConfig& c = config_;
  const int64_t T = b.batch * b.seq, D = c.hidden_size, V = c.vocab_size;
  require(b.batch > 0 && b.seq > 0, "forward: empty batch");
  require(o.mtp_weight == 0, "tensor parallelism: multi-token prediction is not supported yet (mtp_weight must be 0)");
  require(!o.keep_logits, "tensor parallelism: keep_logits is not supported");
  for (int64_t i = 0; i < T; ++i) {
    require(b.input_ids[i] >= 0 && b.input_ids[i] < V,
            "input_ids[" + std::to_string(i) + "] = " + std::to_string(b.input_ids[i]) +
                " is outside the vocabulary [0, " + std::to_string(V) + ")");
    require(b.labels[i] == kIgnoreLabel || (b.labels[i] >= 0 && b.labels[i] < V),
            "labels[" + std::to_string(i) + "] = " + std::to_string(b.labels[i]) + " is outside the vocabulary");
  }
  m.options = o;
  m.batch = b.batch;
  m.seq = b.seq;
  m.ids.assign(b.input_ids, b.input_ids + T);

  LossReport r;
  Buffer x(static_cast<size_t>(T * D)), y(static_cast<size_t>(T * D));
  cpu::embedding_forward(m.embed->value.data<float>(), b.input_ids, T, D, x.data());
  for (auto& layer : m.layers) {
    r.balance_loss += layer->forward(x.data(), b.batch, b.seq, y.data(), o);
    std::swap(x, y);
  }
  m.hidden = std::move(x);
  m.normed.resize(static_cast<size_t>(T * D));
  m.final_norm.forward(m.hidden.data(), T, m.normed.data());

  // The head and the loss are replicated (FP32, as in Model).
  Buffer logits(static_cast<size_t>(T * V));
  cpu::linear_forward(Precision::FP32, m.normed.data(), m.head->value.data<float>(), logits.data(), T, V, D);
  m.dlogits.resize(o.for_backward ? static_cast<size_t>(T * V) : 0);
  int64_t counted = 0, valid = 0;
  for (int64_t i = 0; i < T; ++i) valid += b.labels[i] >= 0;
  const float scale = valid ? 1.0f / static_cast<float>(valid) : 0.0f;
  const double sum = cpu::cross_entropy(logits.data(), b.labels, T, V, scale,
                                         o.for_backward ? m.dlogits.data() : nullptr, &counted);
  r.tokens = counted;
  r.loss = counted ? sum / static_cast<double>(counted) : 0.0;
  r.total = r.loss + r.balance_loss;
  return r;
}

void TensorParallelModel::backward() {
  Impl& m = *impl_;
  const int64_t T = m.batch * m.seq, D = config_.hidden_size, V = config_.vocab_size;
  require(!m.ids.empty(), "backward() called without a forward()");
  require(m.options.for_backward, "backward() after a forward() made with for_backward = false");
  Buffer dnormed(static_cast<size_t>(T * D)), dhidden(static_cast<size_t>(T * D)), dx(static_cast<size_t>(T * D));
  cpu::linear_backward(Precision::FP32, m.dlogits.data(), m.normed.data(), m.head->value.data<float>(), dnormed.data(),
                       m.head->grad.data<float>(), T, V, D);
  m.final_norm.backward(dnormed.data(), m.hidden.data(), T, dhidden.data());
  for (auto it = m.layers.rbegin(); it != m.layers.rend(); ++it) {
    (*it)->backward(dhidden.data(), dx.data());
    std::swap(dhidden, dx);
  }
  cpu::embedding_backward(dhidden.data(), m.ids.data(), T, D, m.embed->grad.data<float>());
  m.ids.clear();  // one backward per forward
}

std::vector<ExpertLoad> TensorParallelModel::expert_loads() const {
  std::vector<ExpertLoad> out;
  for (const auto& l : impl_->layers)
    if (l->moe) out.push_back(l->moe->load());
  return out;
}

std::vector<std::string> TensorParallelModel::router_bias_names() const { return moerl::router_bias_names(config_); }

}  // namespace moerl
