// A pre-norm decoder layer on the GPU: model.cpp's DecoderLayer with the CUDA ops.
#include "runtime/error.hpp"
#include "runtime/gpu/gpu_layers.hpp"
#include "runtime/gpu/gpu_profile.hpp"
#include "runtime/util/env_switch.hpp"

namespace moerl::gpu::detail {
namespace {

// The residual connections around the attention block added inside the norms next to them (forward: into
// post_attention_layernorm; backward: into both norms' input gradients), the same bits as the adds apart;
// MOERL_RESIDUAL_ADD=apart: add_inplace passes (for comparing on the device). Each add pass over [T, hidden] cost
// ~75 us on the H200 at bench-600m's shape (32 a step, 2.4 ms: bench/results/2026-11-30-gpu-trace-h200-d0fd485.txt);
// fused, 3 of the 4 a layer go: train step 240.6k vs 235.2k tokens/s (fp8), 177.6k vs 175.2k (bf16), rounds
// interleaved, and the fp8 Brown curve bit for bit (bench/results/2026-11-30-gpu-sweep-residual-h200-5c66405.txt).
// The fourth (the block's output + h) goes into the routed experts' combine in MoE layers on aligned rows (FP8):
// train step 245.3-245.7k vs 243.1-245.0k tokens/s (fp8), rounds interleaved,
// bench/results/2026-11-30-gpu-combine-residual-h200-814a96d.txt.
bool residual_in_norms() {
  static const bool apart = env_switch("MOERL_RESIDUAL_ADD", "fused", "apart");
  return !apart;
}

}  // namespace

GpuDecoderLayer::GpuDecoderLayer(const ModelConfig& c, ParamStore& params, int64_t layer)
    : attn_(c, params, "model.layers." + std::to_string(layer) + ".self_attn."), dim_(c.hidden_size) {
  const std::string prefix = "model.layers." + std::to_string(layer) + ".";
  norm1_.weight = &params.at(prefix + "input_layernorm.weight");
  norm2_.weight = &params.at(prefix + "post_attention_layernorm.weight");
  norm1_.eps = norm2_.eps = static_cast<float>(c.rms_norm_eps);
  if (c.is_moe_layer(layer))
    moe_ = std::make_unique<GpuMoe>(c, params, prefix + "mlp");
  else
    dense_ = std::make_unique<GpuDense>(params, prefix + "mlp", c.hidden_size, c.intermediate_size);
}

void GpuDecoderLayer::bind(Slab& s, int64_t batch, int64_t seq) {
  const int64_t T = batch * seq;
  tokens_ = T;
  norm1_.bind(s, T);
  norm2_.bind(s, T);
  xn1_ = s.take<float>(T * dim_);
  h_ = s.take<float>(T * dim_);
  xn2_ = s.take<float>(T * dim_);
  attn_.bind(s, batch, seq);
  if (moe_)
    moe_->bind(s, batch, seq);
  else
    dense_->bind(s, T);
}

float GpuDecoderLayer::forward(const float* in, float* out, const Run& r, float balance_alpha, bool for_backward) {
  const int64_t T = tokens_, n = T * dim_;
  require(in != out, "GpuModel: a decoder layer's input and output must be distinct buffers");
  x_ = in;
  norm1_.forward(in, T, xn1_, r);
  {
    const PhaseTimer t(r.precision, "attn.fwd", r.stream);
    attn_.forward(xn1_, h_, r, for_backward);
  }
  const bool fused = residual_in_norms();
  if (fused) {
    norm2_.forward_residual(h_, in, h_, T, xn2_, r);  // h = attention + in, then its norm
  } else {
    add_inplace(h_, in, n, r.stream);
    norm2_.forward(h_, T, xn2_, r);
  }
  float balance = 0.0f;
  const PhaseTimer t(r.precision, moe_ ? "moe.fwd" : "dense.fwd", r.stream);
  if (moe_)  // fused: out = experts + h, the add inside the routed experts' combine
    balance = moe_->forward(xn2_, out, r, balance_alpha, for_backward, fused ? h_ : nullptr);
  else
    dense_->forward(xn2_, out, r);
  if (!moe_ || !fused) add_inplace(out, h_, n, r.stream);
  return balance;
}

void GpuDecoderLayer::backward(const float* dout, float* din, const Run& r) {
  const int64_t T = tokens_, n = T * dim_;
  require(din != dout, "GpuModel: a decoder layer's dout and din must be distinct buffers");
  Temp<float> dxn(n, r), dh(n, r);
  {
    const PhaseTimer t(r.precision, moe_ ? "moe.bwd" : "dense.bwd", r.stream);
    if (moe_)
      moe_->backward(dout, dxn.get(), r);
    else
      dense_->backward(dout, dxn.get(), r);
  }
  const bool fused = residual_in_norms();
  norm2_.backward(dxn.get(), h_, T, dh.get(), r, fused ? dout : nullptr);  // dh = d(norm2 path) + dout, the residual
  if (!fused) add_inplace(dh.get(), dout, n, r.stream);
  {
    const PhaseTimer t(r.precision, "attn.bwd", r.stream);
    attn_.backward(dh.get(), dxn.get(), r);
  }
  norm1_.backward(dxn.get(), x_, T, din, r, fused ? dh.get() : nullptr);  // din = d(norm1 path) + dh
  if (!fused) add_inplace(din, dh.get(), n, r.stream);
}

}  // namespace moerl::gpu::detail
