#include "runtime/model/attention.hpp"

#include <algorithm>
#include <cmath>

#include "kernels/attention.hpp"
#include "kernels/rmsnorm.hpp"
#include "kernels/rope.hpp"
#include "runtime/error.hpp"

namespace moerl {

struct MlaAttention::Impl {
  std::string prefix;
  int64_t hidden, heads, q_lora, kv_lora, dn, dr, dv, dq;  // heads: this rank's (all of them without TP)
  TensorSlice slice;
  bool interleave;
  float theta, eps, scale;

  // Weights, [out, in] (nn.Linear). q_a/q_a_norm/q_b when q_lora > 0, else q_proj.
  Param* q_a = nullptr;
  Param* q_a_norm = nullptr;
  Param* q_b = nullptr;
  Param* q_proj = nullptr;
  Param* kv_a = nullptr;
  Param* kv_a_norm = nullptr;
  Param* kv_b = nullptr;
  Param* o = nullptr;

  // Saved by forward for backward. Norm outputs and rstd are recomputed from their inputs (cheap), and K, V
  // are reassembled from kv and k_rot, which are H times smaller than K.
  bool saved = false;
  Precision precision = Precision::FP32;
  int64_t batch = 0, seq = 0;
  std::vector<float> x;      // [T, hidden]
  std::vector<float> q_a_out;  // [T, q_lora], before q_a_layernorm (q_lora > 0 only)
  std::vector<float> c;      // [T, kv_lora], the latent before kv_a_layernorm
  std::vector<float> q;      // [T, H*dq], per head [q_nope | q_rope after RoPE]
  std::vector<float> kv;     // [T, H*(dn+dv)], per head [k_nope | v]
  std::vector<float> k_rot;  // [T, dr], after RoPE
  std::vector<float> attn;   // [T, H*dv], attention output before o_proj
  std::vector<float> lse;    // [batch, H, seq]

  int64_t tokens() const { return batch * seq; }

  // K [T, H, dq] = [k_nope | k_rot] per head, V [T, H, dv], from kv and k_rot.
  void assemble_kv(std::vector<float>& k, std::vector<float>& v) const {
    const int64_t T = tokens();
    k.resize(static_cast<size_t>(T * heads * dq));
    v.resize(static_cast<size_t>(T * heads * dv));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < heads; ++h) {
        const float* src = kv.data() + (t * heads + h) * (dn + dv);
        float* kd = k.data() + (t * heads + h) * dq;
        std::copy_n(src, dn, kd);
        std::copy_n(k_rot.data() + t * dr, dr, kd + dn);
        std::copy_n(src + dn, dv, v.data() + (t * heads + h) * dv);
      }
  }
};

namespace {
std::vector<float>& sized(std::vector<float>& v, int64_t n) {
  v.resize(static_cast<size_t>(n));
  return v;
}
}  // namespace

MlaAttention::MlaAttention(const ModelConfig& config, Params& params, const std::string& prefix, TensorSlice slice)
    : impl_(std::make_shared<Impl>()) {
  Impl& m = *impl_;
  m.prefix = prefix.empty() || prefix.back() == '.' ? prefix : prefix + ".";
  const std::string where = "attention " + m.prefix + ": ";
  m.hidden = config.hidden_size;
  m.heads = config.num_attention_heads;
  m.q_lora = config.q_lora_rank;
  m.kv_lora = config.kv_lora_rank;
  m.dn = config.qk_nope_head_dim;
  m.dr = config.qk_rope_head_dim;
  m.dv = config.v_head_dim;
  m.dq = m.dn + m.dr;
  require(m.hidden > 0, where + "hidden_size must be positive, got " + std::to_string(m.hidden));
  require(m.heads > 0, where + "num_attention_heads must be positive, got " + std::to_string(m.heads));
  require(m.q_lora >= 0, where + "q_lora_rank must be >= 0, got " + std::to_string(m.q_lora));
  require(m.kv_lora > 0, where + "kv_lora_rank must be positive, got " + std::to_string(m.kv_lora));
  require(m.dn >= 0 && m.dq > 0, where + "qk_nope_head_dim + qk_rope_head_dim must be positive");
  require(m.dr >= 0 && m.dr % 2 == 0,
          where + "qk_rope_head_dim must be even and >= 0 (RoPE rotates pairs), got " + std::to_string(m.dr));
  require(m.dv > 0, where + "v_head_dim must be positive, got " + std::to_string(m.dv));
  require(slice.ranks >= 1 && slice.rank >= 0 && slice.rank < slice.ranks,
          where + "tensor-parallel rank " + std::to_string(slice.rank) + " outside [0, " + std::to_string(slice.ranks) +
              ")");
  require(m.heads % slice.ranks == 0, where + "num_attention_heads " + std::to_string(m.heads) +
                                          " cannot be split evenly over " + std::to_string(slice.ranks) +
                                          " tensor-parallel ranks");
  require(slice.ranks == 1 || slice.all_reduce_sum, where + "tensor parallelism needs an all_reduce_sum");
  m.heads /= slice.ranks;
  m.slice = std::move(slice);
  m.interleave = config.rope_interleave;
  m.theta = static_cast<float>(config.rope_theta);
  m.eps = static_cast<float>(config.rms_norm_eps);
  // HF: self.scaling = qk_head_dim ** -0.5, applied to the FP32 scores.
  m.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(m.dq)));

  const std::string& p = m.prefix;
  if (m.q_lora > 0) {
    m.q_a = &params.add(p + "q_a_proj.weight", {m.q_lora, m.hidden});
    m.q_a_norm = &params.add(p + "q_a_layernorm.weight", {m.q_lora});
    m.q_b = &params.add(p + "q_b_proj.weight", {m.heads * m.dq, m.q_lora});
  } else {
    m.q_proj = &params.add(p + "q_proj.weight", {m.heads * m.dq, m.hidden});
  }
  m.kv_a = &params.add(p + "kv_a_proj_with_mqa.weight", {m.kv_lora + m.dr, m.hidden});
  m.kv_a_norm = &params.add(p + "kv_a_layernorm.weight", {m.kv_lora});
  m.kv_b = &params.add(p + "kv_b_proj.weight", {m.heads * (m.dn + m.dv), m.kv_lora});
  m.o = &params.add(p + "o_proj.weight", {m.hidden, m.heads * m.dv});
}

void MlaAttention::forward(const float* x, int64_t batch, int64_t seq, float* y, Precision precision) {
  Impl& m = *impl_;
  require(batch > 0 && seq > 0, "attention " + m.prefix + ": forward needs batch > 0 and seq > 0, got batch " +
                                    std::to_string(batch) + ", seq " + std::to_string(seq));
  const int64_t T = batch * seq, H = m.heads;
  m.batch = batch;
  m.seq = seq;
  m.precision = precision;
  m.x.assign(x, x + T * m.hidden);

  // Queries [T, H*dq].
  sized(m.q, T * H * m.dq);
  std::vector<float> normed, rstd;
  if (m.q_lora > 0) {
    cpu::linear_forward(precision, x, m.q_a->value.data<float>(), sized(m.q_a_out, T * m.q_lora).data(), T,
                        m.q_lora, m.hidden);
    cpu::rmsnorm_forward(m.q_a_out.data(), m.q_a_norm->value.data<float>(), sized(normed, T * m.q_lora).data(),
                         sized(rstd, T).data(), T, m.q_lora, m.eps);
    cpu::linear_forward(precision, normed.data(), m.q_b->value.data<float>(), m.q.data(), T, H * m.dq, m.q_lora);
  } else {
    cpu::linear_forward(precision, x, m.q_proj->value.data<float>(), m.q.data(), T, H * m.dq, m.hidden);
  }

  // Latent and shared rope key: ckv [T, kv_lora + dr] = [c | k_rot].
  const int64_t ckv_dim = m.kv_lora + m.dr;
  std::vector<float> ckv(static_cast<size_t>(T * ckv_dim));
  cpu::linear_forward(precision, x, m.kv_a->value.data<float>(), ckv.data(), T, ckv_dim, m.hidden);
  sized(m.c, T * m.kv_lora);
  sized(m.k_rot, T * m.dr);
  for (int64_t t = 0; t < T; ++t) {
    std::copy_n(ckv.data() + t * ckv_dim, m.kv_lora, m.c.data() + t * m.kv_lora);
    std::copy_n(ckv.data() + t * ckv_dim + m.kv_lora, m.dr, m.k_rot.data() + t * m.dr);
  }
  cpu::rmsnorm_forward(m.c.data(), m.kv_a_norm->value.data<float>(), sized(normed, T * m.kv_lora).data(),
                       sized(rstd, T).data(), T, m.kv_lora, m.eps);
  cpu::linear_forward(precision, normed.data(), m.kv_b->value.data<float>(), sized(m.kv, T * H * (m.dn + m.dv)).data(),
                      T, H * (m.dn + m.dv), m.kv_lora);

  // RoPE: every head's q_rope, and the one k_rot per token.
  cpu::rope_forward(m.q.data() + m.dn, T, seq, H, H * m.dq, m.dq, m.dr, m.theta, m.interleave);
  cpu::rope_forward(m.k_rot.data(), T, seq, 1, m.dr, m.dr, m.dr, m.theta, m.interleave);

  std::vector<float> k, v;
  m.assemble_kv(k, v);
  cpu::attention_forward(m.q.data(), k.data(), v.data(), sized(m.attn, T * H * m.dv).data(),
                         sized(m.lse, batch * H * seq).data(), batch, seq, H, m.dq, m.dv, m.scale);
  cpu::linear_forward(precision, m.attn.data(), m.o->value.data<float>(), y, T, m.hidden, H * m.dv);
  if (m.slice.ranks > 1) m.slice.all_reduce_sum(y, T * m.hidden);  // row-parallel o_proj: sum of the heads' parts
  m.saved = true;
}

void MlaAttention::backward(const float* dy, float* dx) {
  Impl& m = *impl_;
  require(m.saved, "attention " + m.prefix + ": backward without a preceding forward (or called twice)");
  m.saved = false;
  const Precision p = m.precision;
  const int64_t T = m.tokens(), H = m.heads, dn = m.dn, dr = m.dr, dv = m.dv, dq = m.dq;

  // o_proj.
  std::vector<float> d_attn(static_cast<size_t>(T * H * dv));
  cpu::linear_backward(p, dy, m.attn.data(), m.o->value.data<float>(), d_attn.data(), m.o->grad.data<float>(), T,
                       m.hidden, H * dv);

  // Attention core.
  std::vector<float> k, v;
  m.assemble_kv(k, v);
  std::vector<float> d_q(static_cast<size_t>(T * H * dq)), d_k(k.size()), d_v(v.size());
  cpu::attention_backward(d_attn.data(), m.q.data(), k.data(), v.data(), m.attn.data(), m.lse.data(), d_q.data(),
                          d_k.data(), d_v.data(), m.batch, m.seq, H, dq, dv, m.scale);

  // Back through RoPE; k_rot is shared by the heads, so its gradient is their sum (in head order).
  cpu::rope_backward(d_q.data() + dn, T, m.seq, H, H * dq, dq, dr, m.theta, m.interleave);
  const int64_t ckv_dim = m.kv_lora + dr;
  std::vector<float> d_ckv(static_cast<size_t>(T * ckv_dim));  // [dc | dk_rot]; under TP first [d_normed | dk_rot]
  std::vector<float> d_kv(static_cast<size_t>(T * H * (dn + dv)));
  for (int64_t t = 0; t < T; ++t) {
    float* dkr = d_ckv.data() + t * ckv_dim + m.kv_lora;
    std::fill_n(dkr, dr, 0.0f);
    for (int64_t h = 0; h < H; ++h) {
      const float* dkh = d_k.data() + (t * H + h) * dq;
      float* dst = d_kv.data() + (t * H + h) * (dn + dv);
      std::copy_n(dkh, dn, dst);
      std::copy_n(d_v.data() + (t * H + h) * dv, dv, dst + dn);
      for (int64_t i = 0; i < dr; ++i) dkr[i] += dkh[dn + i];
    }
  }

  // kv_b_proj and kv_a_layernorm (its output and rstd recomputed from the saved latent).
  std::vector<float> normed(static_cast<size_t>(T * m.kv_lora)), rstd(static_cast<size_t>(T));
  std::vector<float> d_normed(normed.size()), d_c(normed.size());
  cpu::rmsnorm_forward(m.c.data(), m.kv_a_norm->value.data<float>(), normed.data(), rstd.data(), T, m.kv_lora, m.eps);
  cpu::linear_backward(p, d_kv.data(), normed.data(), m.kv_b->value.data<float>(), d_normed.data(),
                       m.kv_b->grad.data<float>(), T, H * (dn + dv), m.kv_lora);
  if (m.slice.ranks > 1) {
    // This rank's heads gave partial sums of d_normed and dk_rot: one all-reduce of [d_normed | dk_rot].
    for (int64_t t = 0; t < T; ++t) std::copy_n(d_normed.data() + t * m.kv_lora, m.kv_lora, d_ckv.data() + t * ckv_dim);
    m.slice.all_reduce_sum(d_ckv.data(), T * ckv_dim);
    for (int64_t t = 0; t < T; ++t) std::copy_n(d_ckv.data() + t * ckv_dim, m.kv_lora, d_normed.data() + t * m.kv_lora);
  }
  cpu::rope_backward(d_ckv.data() + m.kv_lora, T, m.seq, 1, ckv_dim, dr, dr, m.theta, m.interleave);
  cpu::rmsnorm_backward(d_normed.data(), m.c.data(), m.kv_a_norm->value.data<float>(), rstd.data(), d_c.data(),
                        m.kv_a_norm->grad.data<float>(), T, m.kv_lora);
  for (int64_t t = 0; t < T; ++t) std::copy_n(d_c.data() + t * m.kv_lora, m.kv_lora, d_ckv.data() + t * ckv_dim);

  // kv_a_proj_with_mqa writes dx; the query path adds to it.
  cpu::linear_backward(p, d_ckv.data(), m.x.data(), m.kv_a->value.data<float>(), dx, m.kv_a->grad.data<float>(), T,
                       ckv_dim, m.hidden);
  std::vector<float> dx_q(static_cast<size_t>(T * m.hidden));
  if (m.q_lora > 0) {
    sized(normed, T * m.q_lora);
    sized(d_normed, T * m.q_lora);
    std::vector<float> d_qa(static_cast<size_t>(T * m.q_lora));
    cpu::rmsnorm_forward(m.q_a_out.data(), m.q_a_norm->value.data<float>(), normed.data(), rstd.data(), T, m.q_lora,
                         m.eps);
    cpu::linear_backward(p, d_q.data(), normed.data(), m.q_b->value.data<float>(), d_normed.data(),
                         m.q_b->grad.data<float>(), T, H * dq, m.q_lora);
    if (m.slice.ranks > 1) m.slice.all_reduce_sum(d_normed.data(), T * m.q_lora);  // column-parallel q_b_proj
    cpu::rmsnorm_backward(d_normed.data(), m.q_a_out.data(), m.q_a_norm->value.data<float>(), rstd.data(),
                          d_qa.data(), m.q_a_norm->grad.data<float>(), T, m.q_lora);
    cpu::linear_backward(p, d_qa.data(), m.x.data(), m.q_a->value.data<float>(), dx_q.data(),
                         m.q_a->grad.data<float>(), T, m.q_lora, m.hidden);
  } else {
    cpu::linear_backward(p, d_q.data(), m.x.data(), m.q_proj->value.data<float>(), dx_q.data(),
                         m.q_proj->grad.data<float>(), T, H * dq, m.hidden);
    if (m.slice.ranks > 1) m.slice.all_reduce_sum(dx_q.data(), T * m.hidden);  // column-parallel q_proj
  }
  for (int64_t i = 0; i < T * m.hidden; ++i) dx[i] += dx_q[i];
}

// ---------------------------------------------------------------------------------------------------------------
// Inference with the compressed cache.

namespace {

// RoPE of `heads` vectors of `dim` dims at position `pos`, in place: the arithmetic of cpu::rope_forward (same
// FP32 steps, so the same bits) for one token at an arbitrary position.
void rope_at(float* x, int64_t pos, int64_t heads, int64_t head_stride, int64_t dim, float theta, bool interleave) {
  const int64_t half = dim / 2;
  const int64_t a_step = interleave ? 2 : 1;
  const int64_t b_off = interleave ? 1 : half;
  for (int64_t i = 0; i < half; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(dim);
    const float inv_freq =
        1.0f / static_cast<float>(std::pow(static_cast<double>(theta), static_cast<double>(exponent)));
    const float angle = static_cast<float>(pos) * inv_freq;
    const float c = static_cast<float>(std::cos(static_cast<double>(angle)));
    const float s = static_cast<float>(std::sin(static_cast<double>(angle)));
    for (int64_t h = 0; h < heads; ++h) {
      float* pa = x + h * head_stride + i * a_step;
      float* pb = pa + b_off;
      const float a = *pa, b = *pb;
      *pa = a * c - b * s;
      *pb = b * c + a * s;
    }
  }
}

}  // namespace

MlaCache MlaAttention::new_cache(int64_t batch, int64_t capacity) const {
  const Impl& m = *impl_;
  require(batch > 0 && capacity > 0, "attention " + m.prefix + ": a cache needs batch > 0 and capacity > 0");
  MlaCache c;
  c.batch = batch;
  c.capacity = capacity;
  c.latent.assign(static_cast<size_t>(batch * capacity * m.kv_lora), 0.0f);
  c.k_rope.assign(static_cast<size_t>(batch * capacity * m.dr), 0.0f);
  return c;
}

void MlaAttention::decode(const float* x, int64_t n_new, MlaCache& cache, float* y, Precision precision) const {
  const Impl& m = *impl_;
  const int64_t B = cache.batch, past = cache.length, L = past + n_new, T = B * n_new, H = m.heads;
  const int64_t dn = m.dn, dr = m.dr, dv = m.dv, dq = m.dq, R = m.kv_lora;
  require(n_new > 0, "attention " + m.prefix + ": decode needs at least one new token");
  require(L <= cache.capacity, "attention " + m.prefix + ": the cache holds " + std::to_string(cache.capacity) +
                                   " positions, decoding needs " + std::to_string(L));
  require(static_cast<int64_t>(cache.latent.size()) == B * cache.capacity * R &&
              static_cast<int64_t>(cache.k_rope.size()) == B * cache.capacity * dr,
          "attention " + m.prefix + ": the cache was made for another block shape");

  // Queries [T, H*dq], RoPE at each token's position.
  std::vector<float> q(static_cast<size_t>(T * H * dq)), normed, rstd;
  if (m.q_lora > 0) {
    std::vector<float> qa(static_cast<size_t>(T * m.q_lora));
    cpu::linear_forward(precision, x, m.q_a->value.data<float>(), qa.data(), T, m.q_lora, m.hidden);
    cpu::rmsnorm_forward(qa.data(), m.q_a_norm->value.data<float>(), sized(normed, T * m.q_lora).data(),
                         sized(rstd, T).data(), T, m.q_lora, m.eps);
    cpu::linear_forward(precision, normed.data(), m.q_b->value.data<float>(), q.data(), T, H * dq, m.q_lora);
  } else {
    cpu::linear_forward(precision, x, m.q_proj->value.data<float>(), q.data(), T, H * dq, m.hidden);
  }
  // New latents and rope keys into the cache.
  const int64_t ckv_dim = R + dr;
  std::vector<float> ckv(static_cast<size_t>(T * ckv_dim));
  cpu::linear_forward(precision, x, m.kv_a->value.data<float>(), ckv.data(), T, ckv_dim, m.hidden);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < n_new; ++i) {
      const int64_t t = b * n_new + i, pos = past + i;
      std::copy_n(ckv.data() + t * ckv_dim, R, cache.latent.data() + (b * cache.capacity + pos) * R);
      float* kr = cache.k_rope.data() + (b * cache.capacity + pos) * dr;
      std::copy_n(ckv.data() + t * ckv_dim + R, dr, kr);
      rope_at(kr, pos, 1, dr, dr, m.theta, m.interleave);
      rope_at(q.data() + t * H * dq + dn, pos, H, dq, dr, m.theta, m.interleave);
    }

  // Expand every cached latent: kv [B*L, H*(dn+dv)] = kv_b_proj(kv_a_layernorm(c)).
  std::vector<float> c(static_cast<size_t>(B * L * R));
  for (int64_t b = 0; b < B; ++b)
    std::copy_n(cache.latent.data() + b * cache.capacity * R, L * R, c.data() + b * L * R);
  cpu::rmsnorm_forward(c.data(), m.kv_a_norm->value.data<float>(), sized(normed, B * L * R).data(),
                       sized(rstd, B * L).data(), B * L, R, m.eps);
  const int64_t kv_dim = H * (dn + dv);
  std::vector<float> kv(static_cast<size_t>(B * L * kv_dim));
  cpu::linear_forward(precision, normed.data(), m.kv_b->value.data<float>(), kv.data(), B * L, kv_dim, R);

  // Causal attention of each new query over positions 0 .. its own; softmax as the kernel computes it.
  std::vector<float> attn(static_cast<size_t>(T * H * dv));
#pragma omp parallel for schedule(static) if (B * H * n_new * L * dq >= (1 << 16))
  for (int64_t task = 0; task < B * H; ++task) {
    const int64_t b = task / H, h = task % H;
    std::vector<float> s(static_cast<size_t>(L));
    for (int64_t i = 0; i < n_new; ++i) {
      const int64_t t = b * n_new + i, pos = past + i;
      const float* qh = q.data() + (t * H + h) * dq;
      float mx = -INFINITY;
      for (int64_t j = 0; j <= pos; ++j) {
        const float* kn = kv.data() + ((b * L + j) * H + h) * (dn + dv);
        const float* kr = cache.k_rope.data() + (b * cache.capacity + j) * dr;
        float dot = 0;
        for (int64_t d = 0; d < dn; ++d) dot += qh[d] * kn[d];
        for (int64_t d = 0; d < dr; ++d) dot += qh[dn + d] * kr[d];
        s[j] = m.scale * dot;
        mx = std::max(mx, s[j]);
      }
      double sum = 0;
      for (int64_t j = 0; j <= pos; ++j) {
        s[j] = std::exp(s[j] - mx);
        sum += s[j];
      }
      const float inv = static_cast<float>(1.0 / sum);
      float* out = attn.data() + (t * H + h) * dv;
      std::fill_n(out, dv, 0.0f);
      for (int64_t j = 0; j <= pos; ++j) {
        const float p = s[j] * inv;
        const float* vj = kv.data() + ((b * L + j) * H + h) * (dn + dv) + dn;
        for (int64_t d = 0; d < dv; ++d) out[d] += p * vj[d];
      }
    }
  }
  cpu::linear_forward(precision, attn.data(), m.o->value.data<float>(), y, T, m.hidden, H * dv);
  if (m.slice.ranks > 1) m.slice.all_reduce_sum(y, T * m.hidden);
  cache.length = L;
}

}  // namespace moerl
