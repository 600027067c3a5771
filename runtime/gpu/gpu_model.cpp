// The DeepSeek-V3 model on one GPU: runtime/model/model.cpp with the CUDA ops (contract: gpu_model.hpp).
//
// Memory: parameters and gradients are one allocation each (ParamStore). The activations backward needs live
// in one "arena" laid out by Slab for the current (batch, seq, MTP run, separate dlogits) and reused by every
// step of that shape; it grows (one cudaMalloc) only when a step needs more than it holds. Everything else is a
// temporary from the device's default stream-ordered pool, whose release threshold is raised to "never" so that
// after the first step the pool serves every request from memory it already holds.
// Host waits in a step: one per MoE layer in forward (its experts' row offsets, and its balance loss when on),
// and the two cross-entropy sums at the end of forward. backward never waits.
#include "runtime/gpu/gpu_model.hpp"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>

#include "kernels/cuda/cross_entropy.hpp"
#include "kernels/cuda/embedding.hpp"
#include "kernels/half.hpp"
#include "runtime/error.hpp"
#include "runtime/gpu/gpu_layers.hpp"
#include "runtime/gpu/gpu_profile.hpp"
#include "runtime/util/env_switch.hpp"

namespace moerl::gpu {

using detail::DeviceAlloc;
using detail::GpuDecoderLayer;
using detail::GpuNorm;
using detail::Run;
using detail::Slab;
using detail::Temp;

namespace {

// A non-blocking stream, destroyed last (it is the first member of Impl).
class OwnedStream {
 public:
  OwnedStream() { CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  ~OwnedStream() {
    (void)cudaStreamSynchronize(s_);
    (void)cudaStreamDestroy(s_);
  }
  OwnedStream(const OwnedStream&) = delete;
  OwnedStream& operator=(const OwnedStream&) = delete;
  cudaStream_t get() const { return s_; }

 private:
  cudaStream_t s_ = nullptr;
};

// The form of d loss / d logits a forward left (head_cross_entropy): FP32 [T, V], or BF16 with row stride ld over
// the logits' storage.
struct HeadGrad {
  bool bf16 = false;
  int64_t ld = 0;
};

// DeepSeek-V3 multi-token prediction, depth 1 (see model.cpp's MtpModule):
//   z_i = eh_proj([enorm(emb(t_{i+1})) ; hnorm(h_i)]),  z'_i = layer(z_i),  logits_i = head(norm(z'_i)).
struct Mtp {
  GpuNorm enorm, hnorm, final_norm;
  const DeviceParam* eh_proj = nullptr;
  GpuDecoderLayer layer;
  // Bound: ids, labels [T] (token i+1 and label i+2 of each position), emb [T, D], cat [T, 2D], z, zl, zn [T, D],
  // logits [T, V] (overwritten by their gradient in the cross-entropy).
  int64_t *ids = nullptr, *labels = nullptr;
  float *emb = nullptr, *cat = nullptr, *z = nullptr, *zl = nullptr, *zn = nullptr, *logits = nullptr;
  HeadGrad grad;  // the form the last forward left d loss / d logits in (see head_cross_entropy)
  std::vector<int64_t> host_ids, host_labels;

  Mtp(const ModelConfig& c, detail::ParamStore& p)
      : layer(c, p, c.num_hidden_layers) {
    const std::string prefix = "model.layers." + std::to_string(c.num_hidden_layers) + ".";
    enorm.weight = &p.at(prefix + "enorm.weight");
    hnorm.weight = &p.at(prefix + "hnorm.weight");
    final_norm.weight = &p.at(prefix + "shared_head.norm.weight");
    eh_proj = &p.at(prefix + "eh_proj.weight");
    enorm.eps = hnorm.eps = final_norm.eps = static_cast<float>(c.rms_norm_eps);
  }

  void bind(Slab& s, int64_t batch, int64_t seq, int64_t D, int64_t logit_floats) {
    const int64_t T = batch * seq;
    ids = s.take<int64_t>(T);
    labels = s.take<int64_t>(T);
    emb = s.take<float>(T * D);
    cat = s.take<float>(T * 2 * D);
    z = s.take<float>(T * D);
    zl = s.take<float>(T * D);
    zn = s.take<float>(T * D);
    logits = s.take<float>(logit_floats);
    enorm.bind(s, T);
    hnorm.bind(s, T);
    final_norm.bind(s, T);
    layer.bind(s, batch, seq);
  }
};

// What the arena is laid out for.
struct ArenaKey {
  int64_t batch = 0, seq = 0;
  bool mtp = false;               // the MTP module runs (its activations are bound)
  bool separate_dlogits = false;  // keep_logits with for_backward: d loss / d logits cannot overwrite the logits
  bool logits16 = false;          // BF16 logits and gradient (head_forward): half the bytes of FP32 ones
  bool backward = false;          // for_backward: the backward's first buffers are bound too (see Impl)
  bool operator==(const ArenaKey&) const = default;
};

// The head's logits [T, V] and their gradient. A BF16 head (the bf16 and fp8 recipes) writes its logits in BF16
// (rounded once in the GEMM's epilogue, as HF transformers' BF16 head gives them) into the first half of the FP32
// storage, and the cross-entropy reads those and writes d loss / d logits rounded to BF16 over them (row stride V):
// half the bytes of FP32 logits written by the GEMM and read by the cross-entropy, and no second [T, V] buffer.
// MOERL_HEAD_LOGITS=fp32 keeps FP32 logits (for comparing on the device; read once); their BF16 gradient then fills
// each row's first half (row stride 2V), or with MOERL_HEAD_GRAD=fp32 stays FP32 and the backward rounds it.
// On the H200 against FP32 logits, rounds interleaved: bench-600m fp8 step 290.6k / 287.2k vs 287.4k / 286.2k
// tokens/s, the cross-entropy at 16384 x 32000 1.01 vs 1.27 ms (bench/results/2026-11-30-gpu-head-bf16-logits-h200-
// aa5bce5+logits.txt).
// Tried and removed: the head's GEMM and this cross-entropy in 4 or 8 row chunks, each chunk's cross-entropy on a
// side stream while the next chunk's GEMM ran: bit-identical, no faster (fp8 284.8k / 284.0k with 4 chunks, 287.1k /
// 288.1k with 8, 289.6k / 284.0k with one; bench/results/2026-11-30-gpu-head-ce-chunks-h200-bba286b+chunks.txt).
bool bf16_logits(Precision head_p, int64_t V) {
  static const bool fp32 = env_switch("MOERL_HEAD_LOGITS", "bf16", "fp32");
  return head_p == Precision::BF16 && !fp32 && V % 4 == 0;
}

// logits16: bf16_logits's answer, the arena's layout (ArenaKey::logits16). x16_keep: where the BF16 head keeps x
// rounded for head_backward's x16 (null: a temporary).
void head_forward(cuda::LinearContext& linear, Precision head_p, bool logits16, const float* x, const DeviceParam& w,
                  float* logits, int64_t T, int64_t V, int64_t D, cudaStream_t s, uint16_t* x16_keep = nullptr) {
  if (logits16)
    cuda::linear_forward_bf16_out(linear, x, w.value, reinterpret_cast<uint16_t*>(logits), T, V, D, s, x16_keep);
  else
    cuda::linear_forward(linear, head_p, x, w.value, logits, T, V, D, s);
}

double head_cross_entropy(Precision head_p, bool logits16, float* logits, const int64_t* labels, int64_t T, int64_t V,
                          float scale, float* dlogits, int64_t* counted, HeadGrad& grad, cudaStream_t s) {
  static const bool fp32_grad = env_switch("MOERL_HEAD_GRAD", "bf16", "fp32");
  grad = HeadGrad{};
  if (logits16) {
    uint16_t* d16 = reinterpret_cast<uint16_t*>(dlogits);  // over the logits, or the separate buffer's first half
    grad = HeadGrad{true, V};
    return cuda::cross_entropy_bf16_logits(reinterpret_cast<const uint16_t*>(logits), labels, T, V, scale, d16,
                                           counted, s);
  }
  uint16_t* in_place = reinterpret_cast<uint16_t*>(logits);
  if (!fp32_grad && dlogits == logits && head_p == Precision::BF16 &&
      cuda::cross_entropy_bf16_grad_supported(logits, V, in_place, 2 * V)) {
    grad = HeadGrad{true, 2 * V};
    return cuda::cross_entropy_bf16_grad(logits, labels, T, V, scale, in_place, 2 * V, counted, s);
  }
  return cuda::cross_entropy(logits, labels, T, V, scale, dlogits, counted, s);
}

// x16: head_forward's x16_keep, or null.
void head_backward(cuda::LinearContext& linear, Precision head_p, const float* dlogits, const HeadGrad& grad,
                   const float* x, const DeviceParam& w, float* dx, int64_t T, int64_t V, int64_t D, cudaStream_t s,
                   const uint16_t* x16 = nullptr) {
  const bool overwrite = detail::take_unset(w);
  if (grad.bf16)
    cuda::linear_backward_bf16_dy(linear, reinterpret_cast<const uint16_t*>(dlogits), grad.ld, x, w.value, dx, w.grad,
                                  T, V, D, s, false, overwrite, x16);
  else
    cuda::linear_backward(linear, head_p, dlogits, x, w.value, dx, w.grad, T, V, D, s, false, overwrite);
}

}  // namespace

struct GpuModel::Impl {
  OwnedStream stream;
  detail::ParamStore params;
  cuda::LinearContext linear;
  cudaMemPool_t pool = nullptr;
  bool poison = false;

  const DeviceParam* embed = nullptr;
  const DeviceParam* head = nullptr;
  GpuNorm final_norm;
  std::vector<std::unique_ptr<GpuDecoderLayer>> layers;
  std::unique_ptr<Mtp> mtp;

  // The arena and what is bound in it: ids, labels [T], hidden[l] [T, D] (the input of layer l; hidden[L] the
  // last layer's output), normed [T, D], logits [T, V] (overwritten by d loss / d logits unless kept), dlogits
  // [T, V] when separate. For a backward (ArenaKey::backward): dnormed, dh_a, dh_b [T, D], the gradients the
  // backward starts with, and with a BF16 head normed16 [T, D], normed rounded to BF16 by the head's forward for its
  // Wgrad. Bound rather than taken from the pool when the backward starts: the device waits for the loss there, and
  // the pool's allocations took ~74 us of host time before the first launch (median, on the H200's host,
  // bench/results/2026-11-30-gpu-silu-times4-h200-3bda270+silu.txt).
  DeviceAlloc arena;
  ArenaKey key;
  bool bound = false;
  int64_t *ids = nullptr, *labels = nullptr;
  std::vector<float*> hidden;
  float *normed = nullptr, *logits = nullptr, *dlogits = nullptr;
  float *dnormed = nullptr, *dh_a = nullptr, *dh_b = nullptr;
  uint16_t* normed16 = nullptr;
  size_t own_peak = 0;

  // The last forward.
  ForwardOptions options;
  bool have_forward = false;  // a forward made for backward, not yet differentiated
  bool logits_kept = false;
  HeadGrad grad;  // the form the last forward left d loss / d logits in (head_cross_entropy)

  Impl(const ModelConfig& c, int shards) : params(c, shards) {}

  size_t own_bytes() const { return params.device_bytes() + arena.bytes(); }

  void layout(Slab& s, const ArenaKey& k, const ModelConfig& c) {
    const int64_t T = k.batch * k.seq, D = c.hidden_size, V = c.vocab_size;
    ids = s.take<int64_t>(T);
    labels = s.take<int64_t>(T);
    hidden.assign(layers.size() + 1, nullptr);
    for (float*& h : hidden) h = s.take<float>(T * D);
    normed = s.take<float>(T * D);
    const int64_t logit_floats = k.logits16 ? (T * V + 1) / 2 : T * V;  // [T, V] in BF16 or FP32
    logits = s.take<float>(logit_floats);
    dlogits = k.separate_dlogits ? s.take<float>(logit_floats) : nullptr;
    dnormed = k.backward ? s.take<float>(T * D) : nullptr;
    dh_a = k.backward ? s.take<float>(T * D) : nullptr;
    dh_b = k.backward ? s.take<float>(T * D) : nullptr;
    normed16 = k.backward && k.logits16 ? s.take<uint16_t>(T * D) : nullptr;
    final_norm.bind(s, T);
    for (auto& l : layers) l->bind(s, k.batch, k.seq);
    if (k.mtp) mtp->bind(s, k.batch, k.seq, D, logit_floats);
  }

  void ensure_bound(const ArenaKey& k, const ModelConfig& c) {
    if (!bound || !(k == key)) {
      Slab plan;
      layout(plan, k, c);
      if (plan.used() > arena.bytes()) {
        arena = DeviceAlloc();  // free before allocating the larger block
        arena = DeviceAlloc(plan.used());
      }
      Slab real(arena.get());
      layout(real, k, c);
      key = k;
      bound = true;
      own_peak = std::max(own_peak, own_bytes());
    }
    if (poison) CUDA_CHECK(cudaMemsetAsync(arena.get(), 0xFF, arena.bytes(), stream.get()));
  }
};

GpuModel::GpuModel(ModelConfig config, int shards) : config_(std::move(config)) {
  config_.validate("GpuModel config");
  impl_ = std::make_unique<Impl>(config_, shards);
  Impl& m = *impl_;
  const ModelConfig& c = config_;
  m.embed = &m.params.at("model.embed_tokens.weight");
  m.head = c.tie_word_embeddings ? m.embed : &m.params.at("lm_head.weight");
  m.final_norm.weight = &m.params.at("model.norm.weight");
  m.final_norm.eps = static_cast<float>(c.rms_norm_eps);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l)
    m.layers.push_back(std::make_unique<GpuDecoderLayer>(c, m.params, l));
  if (c.num_nextn_predict_layers > 0) m.mtp = std::make_unique<Mtp>(c, m.params);

  // Temporaries come from the default pool; keep what it has reserved instead of returning it to the driver at
  // every synchronization, so a steady-state step allocates nothing.
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetDefaultMemPool(&m.pool, device));
  uint64_t threshold = std::numeric_limits<uint64_t>::max();
  CUDA_CHECK(cudaMemPoolSetAttribute(m.pool, cudaMemPoolAttrReleaseThreshold, &threshold));
  m.own_peak = m.own_bytes();
}

GpuModel::~GpuModel() = default;

void GpuModel::upload(const Params& host) {
  impl_->params.upload(host, impl_->stream.get());
  impl_->linear.weights_changed();
}

void GpuModel::download(Params& host, bool grads) const {
  if (grads) impl_->params.settle_grads(impl_->stream.get());
  impl_->params.download(host, grads, impl_->stream.get());
}

void GpuModel::settle_grads() { impl_->params.settle_grads(impl_->stream.get()); }

void GpuModel::zero_grad() { impl_->params.zero_grad(impl_->stream.get()); }

const std::vector<DeviceParam>& GpuModel::params() const { return impl_->params.all(); }
cuda::LinearContext& GpuModel::linear() { return impl_->linear; }
cudaStream_t GpuModel::stream() const { return impl_->stream.get(); }
float* GpuModel::flat_values() const { return impl_->params.values(); }
float* GpuModel::flat_grads() const { return impl_->params.grads(); }
size_t GpuModel::flat_size() const { return impl_->params.bytes() / sizeof(float); }
void GpuModel::set_debug_poison(bool on) { impl_->poison = on; }

LossReport GpuModel::forward(const TokenBatch& b, const ForwardOptions& o) {
  Impl& m = *impl_;
  const ModelConfig& c = config_;
  const int64_t T = b.batch * b.seq, D = c.hidden_size, V = c.vocab_size;
  require(b.batch > 0 && b.seq > 0, "forward: empty batch");
  require(b.input_ids && b.labels, "forward: null input_ids or labels");
  for (int64_t i = 0; i < T; ++i) {
    require(b.input_ids[i] >= 0 && b.input_ids[i] < V, [&] {
      return "input_ids[" + std::to_string(i) + "] = " + std::to_string(b.input_ids[i]) +
             " is outside the vocabulary [0, " + std::to_string(V) + ")";
    });
    require(b.labels[i] == kIgnoreLabel || (b.labels[i] >= 0 && b.labels[i] < V), [&] {
      return "labels[" + std::to_string(i) + "] = " + std::to_string(b.labels[i]) + " is outside the vocabulary";
    });
  }
  const bool run_mtp = m.mtp && o.mtp_weight > 0;
  m.have_forward = false;
  m.logits_kept = false;
  // DeepSeek-V3 keeps the output head in higher precision: FP32 in the fp32 recipe, BF16 operands otherwise.
  const Precision head_p = o.precision == Precision::FP32 ? Precision::FP32 : Precision::BF16;
  m.ensure_bound({b.batch, b.seq, run_mtp, o.keep_logits && o.for_backward, bf16_logits(head_p, V), o.for_backward},
                 c);
  m.options = o;
  const cudaStream_t s = m.stream.get();
  const Run run{s, &m.linear, o.precision, m.poison};
  const size_t id_bytes = static_cast<size_t>(T) * sizeof(int64_t);
  // From pageable memory: staged before the calls return.
  CUDA_CHECK(cudaMemcpyAsync(m.ids, b.input_ids, id_bytes, cudaMemcpyHostToDevice, s));
  CUDA_CHECK(cudaMemcpyAsync(m.labels, b.labels, id_bytes, cudaMemcpyHostToDevice, s));

  LossReport r;
  const detail::PhaseTimer whole(o.precision, "model.fwd", s);
  std::optional<detail::PhaseTimer> phase(std::in_place, o.precision, "embed.fwd", s);
  cuda::embedding_forward(m.embed->value, m.ids, T, D, m.hidden[0], s);
  phase.reset();
  for (size_t l = 0; l < m.layers.size(); ++l)
    r.balance_loss += m.layers[l]->forward(m.hidden[l], m.hidden[l + 1], run, o.balance_alpha, o.for_backward);
  const float* last = m.hidden.back();
  phase.emplace(o.precision, "head+ce.fwd", s);
  m.final_norm.forward(last, T, m.normed, run);
  head_forward(m.linear, head_p, m.key.logits16, m.normed, *m.head, m.logits, T, V, D, s, m.normed16);

  // The MTP module is enqueued before the cross-entropies wait, so the device keeps busy.
  float mtp_balance = 0.0f;
  int64_t mtp_valid = 0;
  if (run_mtp) {
    Mtp& mt = *m.mtp;
    // Position i (sequence s) reads token t_{i+1} and predicts t_{i+2} = labels[i+1].
    mt.host_ids.resize(static_cast<size_t>(T));
    mt.host_labels.resize(static_cast<size_t>(T));
    for (int64_t q = 0; q < b.batch; ++q)
      for (int64_t i = 0; i < b.seq; ++i) {
        const int64_t t = q * b.seq + i;
        const bool last_pos = i + 1 == b.seq;
        mt.host_ids[static_cast<size_t>(t)] = last_pos ? std::max<int64_t>(b.labels[t], 0) : b.input_ids[t + 1];
        mt.host_labels[static_cast<size_t>(t)] = last_pos ? kIgnoreLabel : b.labels[t + 1];
        mtp_valid += mt.host_labels[static_cast<size_t>(t)] >= 0;
      }
    CUDA_CHECK(cudaMemcpyAsync(mt.ids, mt.host_ids.data(), id_bytes, cudaMemcpyHostToDevice, s));
    CUDA_CHECK(cudaMemcpyAsync(mt.labels, mt.host_labels.data(), id_bytes, cudaMemcpyHostToDevice, s));
    cuda::embedding_forward(m.embed->value, mt.ids, T, D, mt.emb, s);
    mt.enorm.forward(mt.emb, T, mt.cat, run, 2 * D);  // cat = [en | hn], each norm writing its half
    mt.hnorm.forward(last, T, mt.cat + D, run, 2 * D);
    cuda::linear_forward(m.linear, o.precision, mt.cat, mt.eh_proj->value, mt.z, T, D, 2 * D, s);
    mtp_balance = mt.layer.forward(mt.z, mt.zl, run, o.balance_alpha, o.for_backward);
    mt.final_norm.forward(mt.zl, T, mt.zn, run);
    head_forward(m.linear, head_p, m.key.logits16, mt.zn, *m.head, mt.logits, T, V, D, s);
  }

  // Main cross-entropy (waits for the stream). Without kept logits the gradient overwrites them in place.
  int64_t valid = 0;
  for (int64_t i = 0; i < T; ++i) valid += b.labels[i] >= 0;
  const float scale = valid ? 1.0f / static_cast<float>(valid) : 0.0f;
  float* dl = !o.for_backward ? nullptr : m.dlogits ? m.dlogits : m.logits;
  int64_t counted = 0;
  const double sum =
      head_cross_entropy(head_p, m.key.logits16, m.logits, m.labels, T, V, scale, dl, &counted, m.grad, s);
  r.tokens = counted;
  r.loss = counted ? sum / static_cast<double>(counted) : 0.0;

  if (run_mtp) {
    Mtp& mt = *m.mtp;
    r.balance_loss += mtp_balance;
    const float mscale = mtp_valid ? o.mtp_weight / static_cast<float>(mtp_valid) : 0.0f;
    int64_t mcounted = 0;
    const double msum = head_cross_entropy(head_p, m.key.logits16, mt.logits, mt.labels, T, V, mscale,
                                           o.for_backward ? mt.logits : nullptr, &mcounted, mt.grad, s);
    r.mtp_loss = mcounted ? msum / static_cast<double>(mcounted) : 0.0;
  }
  r.total = r.loss + o.mtp_weight * r.mtp_loss + r.balance_loss;
  m.have_forward = o.for_backward;
  m.logits_kept = o.keep_logits;
  return r;
}

void GpuModel::backward() {
  Impl& m = *impl_;
  const ModelConfig& c = config_;
  require(m.have_forward || !m.options.for_backward, "backward() called without a forward()");
  require(m.options.for_backward, "backward() after a forward() made with for_backward = false");
  m.have_forward = false;  // one backward per forward
  const int64_t T = m.key.batch * m.key.seq, D = c.hidden_size, V = c.vocab_size;
  const cudaStream_t s = m.stream.get();
  const Run run{s, &m.linear, m.options.precision, m.poison};
  const Precision head_p = m.options.precision == Precision::FP32 ? Precision::FP32 : Precision::BF16;
  const float* last = m.hidden.back();

  const detail::PhaseTimer whole(m.options.precision, "model.bwd", s);
  float* dhidden = m.dh_a;
  float* dx = m.dh_b;
  std::optional<detail::PhaseTimer> phase(std::in_place, m.options.precision, "head.bwd", s);
  head_backward(m.linear, head_p, m.dlogits ? m.dlogits : m.logits, m.grad, m.normed, *m.head, m.dnormed, T, V, D, s,
                m.normed16);
  m.final_norm.backward(m.dnormed, last, T, dhidden, run);
  phase.reset();

  if (m.key.mtp) {
    Mtp& mt = *m.mtp;
    Temp<float> dzn(T * D, run), dzl(T * D, run), dz(T * D, run), dcat(T * 2 * D, run), tmp(T * D, run);
    head_backward(m.linear, head_p, mt.logits, mt.grad, mt.zn, *m.head, dzn.get(), T, V, D, s);
    mt.final_norm.backward(dzn.get(), mt.zl, T, dzl.get(), run);
    mt.layer.backward(dzl.get(), dz.get(), run);
    cuda::linear_backward(m.linear, m.options.precision, dz.get(), mt.cat, mt.eh_proj->value, dcat.get(),
                          mt.eh_proj->grad, T, D, 2 * D, s, false, detail::take_unset(*mt.eh_proj));
    // dcat = [den | dhn]: each norm reads its half.
    mt.hnorm.backward(dcat.get() + D, last, T, tmp.get(), run, nullptr, 2 * D);
    detail::add_inplace(dhidden, tmp.get(), T * D, s);
    mt.enorm.backward(dcat.get(), mt.emb, T, tmp.get(), run, nullptr, 2 * D);
    detail::zero_if_unset(*m.embed, s);
    cuda::embedding_backward(tmp.get(), mt.ids, T, D, m.embed->grad, s);
  }

  for (auto it = m.layers.rbegin(); it != m.layers.rend(); ++it) {
    (*it)->backward(dhidden, dx, run);
    std::swap(dhidden, dx);
  }
  detail::zero_if_unset(*m.embed, s);
  cuda::embedding_backward(dhidden, m.ids, T, D, m.embed->grad, s);
  m.params.settle_grads(s);  // what no producer wrote (e.g. a layer's unused MTP weights) holds zeros
}

std::vector<float> GpuModel::logits() const {
  const Impl& m = *impl_;
  require(m.logits_kept, "logits() needs a forward pass with keep_logits");
  std::vector<float> out(static_cast<size_t>(m.key.batch * m.key.seq * config_.vocab_size));
  if (m.key.logits16) {  // widened: each BF16 value exactly
    std::vector<uint16_t> bits(out.size());
    CUDA_CHECK(cudaMemcpyAsync(bits.data(), m.logits, bits.size() * sizeof(uint16_t), cudaMemcpyDeviceToHost,
                               m.stream.get()));
    CUDA_CHECK(cudaStreamSynchronize(m.stream.get()));
    for (size_t i = 0; i < out.size(); ++i) out[i] = float_from_bf16(bits[i]);
    return out;
  }
  CUDA_CHECK(cudaMemcpyAsync(out.data(), m.logits, out.size() * sizeof(float), cudaMemcpyDeviceToHost,
                             m.stream.get()));
  CUDA_CHECK(cudaStreamSynchronize(m.stream.get()));
  return out;
}

void GpuModel::update_router_bias(float gamma) { update_router_bias(gamma, expert_loads()); }

void GpuModel::update_router_bias(float gamma, const std::vector<ExpertLoad>& loads) {
  Impl& m = *impl_;
  std::vector<detail::GpuMoe*> moes;
  for (auto& l : m.layers)
    if (l->moe()) moes.push_back(l->moe());
  if (m.mtp && m.mtp->layer.moe()) moes.push_back(m.mtp->layer.moe());
  require(loads.size() == moes.size(), [&] {
    return "GpuModel::update_router_bias: " + std::to_string(loads.size()) + " expert loads for " +
           std::to_string(moes.size()) + " MoE layers";
  });
  for (size_t i = 0; i < moes.size(); ++i) moes[i]->update_bias(gamma, loads[i], m.stream.get());
}

std::vector<ExpertLoad> GpuModel::expert_loads() const {
  const Impl& m = *impl_;
  std::vector<ExpertLoad> out;
  for (auto& l : m.layers)
    if (l->moe()) out.push_back(l->moe()->load());
  if (m.mtp && m.mtp->layer.moe()) out.push_back(m.mtp->layer.moe()->load());
  return out;
}

size_t GpuModel::peak_memory_bytes() const {
  const Impl& m = *impl_;
  uint64_t pool_high = 0;
  CUDA_CHECK(cudaMemPoolGetAttribute(m.pool, cudaMemPoolAttrUsedMemHigh, &pool_high));
  return std::max(m.own_peak, m.own_bytes()) + m.linear.prepared_bytes() + static_cast<size_t>(pool_high);
}

void GpuModel::reset_peak_memory() {
  Impl& m = *impl_;
  uint64_t zero = 0;  // resets the high-water mark to the memory in use now
  CUDA_CHECK(cudaMemPoolSetAttribute(m.pool, cudaMemPoolAttrUsedMemHigh, &zero));
  m.own_peak = m.own_bytes();
}

}  // namespace moerl::gpu
