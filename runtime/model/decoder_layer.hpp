// The pre-norm decoder layer of the CPU models, h = x + attn(norm1(x)); out = h + ffn(norm2(h)), shared by the
// whole model (model.cpp: MlaAttention whole, DenseFeedForward) and a tensor-parallel rank (tp_model.cpp: the
// rank's slice of heads and dense columns). The feed-forward is MoE or dense; the caller builds the one it needs.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "kernels/rmsnorm.hpp"
#include "runtime/model/attention.hpp"
#include "runtime/model/feed_forward.hpp"
#include "runtime/model/model.hpp"

namespace moerl {

// dst[i] += src[i], i < n.
inline void add_into(float* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

// RMSNorm with its rstd saved for backward (the caller keeps the input x [rows, dim]).
struct SavedNorm {
  Param* weight = nullptr;
  float eps = 1e-6f;
  std::vector<float> rstd;  // [rows]

  void forward(const float* x, int64_t rows, float* y) {
    const int64_t dim = weight->value.numel();
    rstd.resize(static_cast<size_t>(rows));
    cpu::rmsnorm_forward(x, weight->value.data<float>(), y, rstd.data(), rows, dim, eps);
  }
  // dx = d/dx of the norm applied to dy, weight gradient accumulated.
  void backward(const float* dy, const float* x, int64_t rows, float* dx) {
    const int64_t dim = weight->value.numel();
    cpu::rmsnorm_backward(dy, x, weight->value.data<float>(), rstd.data(), dx, weight->grad.data<float>(), rows, dim);
  }
};

// Dense: the dense feed-forward's type (DenseFeedForward or TpDenseFeedForward).
template <class Dense>
struct PreNormLayer {
  SavedNorm norm1, norm2;
  MlaAttention attn;
  std::unique_ptr<Dense> dense;           // one of dense and moe, built by the caller
  std::unique_ptr<MoeFeedForward> moe;
  int64_t dim;
  std::vector<float> x, xn1, h, xn2;      // saved activations, [T, dim] each

  // prefix "model.layers.N."; attn_args after MlaAttention's (config, params, name): e.g. a TensorSlice.
  template <class... AttnArgs>
  PreNormLayer(const ModelConfig& c, Params& p, const std::string& prefix, AttnArgs&&... attn_args)
      : attn(c, p, prefix + "self_attn", std::forward<AttnArgs>(attn_args)...), dim(c.hidden_size) {
    norm1.weight = &p.add(prefix + "input_layernorm.weight", {c.hidden_size});
    norm2.weight = &p.add(prefix + "post_attention_layernorm.weight", {c.hidden_size});
    norm1.eps = norm2.eps = static_cast<float>(c.rms_norm_eps);
  }

  // in, out: [batch*seq, dim]; returns the balance loss of this layer (0 for dense layers).
  float forward(const float* in, int64_t batch, int64_t seq, float* out, const ForwardOptions& o) {
    const int64_t T = batch * seq, n = T * dim;
    x.assign(in, in + n);
    xn1.resize(static_cast<size_t>(n));
    h.resize(static_cast<size_t>(n));
    xn2.resize(static_cast<size_t>(n));
    norm1.forward(x.data(), T, xn1.data());
    attn.forward(xn1.data(), batch, seq, h.data(), o.precision);
    add_into(h.data(), x.data(), n);
    norm2.forward(h.data(), T, xn2.data());
    float balance = 0;
    if (moe)
      balance = moe->forward(xn2.data(), batch, seq, out, o.precision, o.balance_alpha);
    else
      dense->forward(xn2.data(), T, out, o.precision);
    add_into(out, h.data(), n);
    return balance;
  }

  // dout [T, dim] -> din [T, dim] (overwritten).
  void backward(const float* dout, float* din) {
    const int64_t n = static_cast<int64_t>(x.size()), T = n / dim;
    std::vector<float> dxn(static_cast<size_t>(n)), dh(dout, dout + n), tmp(static_cast<size_t>(n));
    if (moe)
      moe->backward(dout, dxn.data());
    else
      dense->backward(dout, dxn.data());
    norm2.backward(dxn.data(), h.data(), T, tmp.data());
    add_into(dh.data(), tmp.data(), n);
    attn.backward(dh.data(), dxn.data());
    norm1.backward(dxn.data(), x.data(), T, din);
    add_into(din, dh.data(), n);
  }
};

}  // namespace moerl
