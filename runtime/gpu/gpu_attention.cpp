// Multi-head latent attention on the GPU: runtime/model/attention.cpp step for step, with the CUDA ops.
#include <algorithm>
#include <cmath>
#include <cstddef>

#include "kernels/cuda/attention.hpp"
#include "kernels/cuda/rmsnorm.hpp"
#include "kernels/cuda/rope.hpp"
#include "runtime/error.hpp"
#include "runtime/gpu/gpu_layers.hpp"
#include "runtime/gpu/gpu_profile.hpp"
#include "runtime/util/env_switch.hpp"

namespace moerl::gpu::detail {

GpuMla::GpuMla(const ModelConfig& c, ParamStore& params, const std::string& prefix)
    : prefix_(prefix),
      hidden_(c.hidden_size),
      heads_(c.num_attention_heads),
      q_lora_(c.q_lora_rank),
      kv_lora_(c.kv_lora_rank),
      dn_(c.qk_nope_head_dim),
      dr_(c.qk_rope_head_dim),
      dv_(c.v_head_dim),
      dq_(c.qk_head_dim()),
      interleave_(c.rope_interleave),
      theta_(static_cast<float>(c.rope_theta)),
      eps_(static_cast<float>(c.rms_norm_eps)),
      // HF: self.scaling = qk_head_dim ** -0.5, applied to the FP32 scores.
      scale_(static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.qk_head_dim())))) {
  require(dq_ == 24 || dq_ == 96 || dq_ == 192, [&] {
    return "GpuModel: attention " + prefix +
           ": the CUDA attention kernel takes qk_nope_head_dim + qk_rope_head_dim "
           "in {24, 96, 192}, got " +
           std::to_string(dq_);
  });
  require(dv_ == 16 || dv_ == 64 || dv_ == 128, [&] {
    return "GpuModel: attention " + prefix + ": the CUDA attention kernel takes v_head_dim in {16, 64, 128}, got " +
           std::to_string(dv_);
  });
  if (q_lora_ > 0) {
    q_a_ = &params.at(prefix + "q_a_proj.weight");
    q_a_norm_ = &params.at(prefix + "q_a_layernorm.weight");
    q_b_ = &params.at(prefix + "q_b_proj.weight");
  } else {
    q_proj_ = &params.at(prefix + "q_proj.weight");
  }
  kv_a_ = &params.at(prefix + "kv_a_proj_with_mqa.weight");
  kv_a_norm_ = &params.at(prefix + "kv_a_layernorm.weight");
  kv_b_ = &params.at(prefix + "kv_b_proj.weight");
  o_ = &params.at(prefix + "o_proj.weight");
}

void GpuMla::bind(Slab& s, int64_t batch, int64_t seq) {
  const int64_t T = batch * seq, H = heads_;
  batch_ = batch;
  seq_ = seq;
  q_a_out_ = q_lora_ > 0 ? s.take<float>(T * q_lora_) : nullptr;
  ckv_ = s.take<float>(T * (kv_lora_ + dr_));
  q_ = s.take<float>(T * H * dq_);
  // k, v (FP32 recipe) and the packed BF16 operands of the tensor-core kernels (bf16 and fp8 recipes, when MLA's
  // keys and values can be packed straight from kv_b_proj's output) share one region: a forward writes one or the
  // other, and its backward reads what it wrote.
  const size_t bytes_k = align256(static_cast<size_t>(T * H * dq_) * sizeof(float)),
               bytes_v = align256(static_cast<size_t>(T * H * dv_) * sizeof(float));
  packed_mla_ = cuda::attention_bf16_supported(dq_, dv_) &&
                cuda::attention_pack_mla_bf16_supported(kv_lora_, dn_, dr_, dv_);
  const size_t bytes_packed = packed_mla_ ? cuda::attention_bf16_packed_bytes(batch, seq, H, dq_, dv_) : 0;
  char* kv_region = s.take<char>(static_cast<int64_t>(std::max(bytes_k + bytes_v, bytes_packed)));
  k_ = reinterpret_cast<float*>(kv_region);
  v_ = kv_region ? reinterpret_cast<float*>(kv_region + bytes_k) : nullptr;
  packed_ = kv_region;
  attn_ = s.take<float>(T * H * dv_);
  lse_ = s.take<float>(batch * H * seq);
  saved_ = false;
}

void GpuMla::forward(const float* x, float* y, const Run& r, bool for_backward) {
  if (!for_backward) x_saved_.release(), attn_saved_.release();  // an earlier forward's, no longer wanted
  const int64_t T = batch_ * seq_, H = heads_, ckv_dim = kv_lora_ + dr_;
  const Precision p = r.precision;
  cuda::LinearContext& lin = *r.linear;
  x_ = x;
  precision_ = p;
  cuda_detail::PhaseSequence phase = sub_phases(p, "attn.fwd", r.stream);

  // Queries [T, H*dq] (through q_a's latent with q_lora) and the latent with the shared rope key, ckv [T, kv_lora +
  // dr] = [c | k_rope]: both projections of x, which is rounded or quantized once for the two.
  phase.next("q");
  const cuda::LinearOutput q_out = q_lora_ > 0 ? cuda::LinearOutput{q_a_->value, q_a_out_, q_lora_}
                                               : cuda::LinearOutput{q_proj_->value, q_, H * dq_};
  cuda::linear_forward_shared(lin, p, x, {q_out, {kv_a_->value, ckv_, ckv_dim}}, T, hidden_, r.stream,
                              for_backward ? &x_saved_ : nullptr);
  if (q_lora_ > 0) {
    Temp<float> normed(T * q_lora_, r), rstd(T, r);
    cuda::rmsnorm_forward(q_a_out_, q_a_norm_->value, normed.get(), rstd.get(), T, q_lora_, eps_, r.stream);
    cuda::linear_forward(lin, p, normed.get(), q_b_->value, q_, T, H * dq_, q_lora_, r.stream);
  }

  // c's norm reads it inside ckv (rows ckv_dim apart): no contiguous copy (21 us a layer each way at bench-600m).
  phase.next("kv");
  Temp<float> kv(T * H * (dn_ + dv_), r);
  {
    Temp<float> normed(T * kv_lora_, r), rstd(T, r);
    cuda::rmsnorm_forward(ckv_, kv_a_norm_->value, normed.get(), rstd.get(), T, kv_lora_, eps_, r.stream, ckv_dim);
    cuda::linear_forward(lin, p, normed.get(), kv_b_->value, kv.get(), T, H * (dn_ + dv_), kv_lora_, r.stream);
  }

  // bf16 and fp8 recipes: the core on tensor cores with BF16 operands (as PyTorch's sdpa in a bf16 model), packed
  // once here from q and straight from kv and ckv (no FP32 k, v) and kept for the backward; fp32 (and head dims
  // without tensor-core kernels): k, v assembled in FP32 for the FP32 kernels.
  const bool tc = p != Precision::FP32 && cuda::attention_bf16_supported(dq_, dv_);
  used_packed_ = tc && packed_mla_;
  // RoPE: every head's q_rope, and the one k_rope per token (in place inside ckv); with interleaved pairs on the
  // packed path, rotated by the packing instead (the same bits, without the rope passes over q and ckv: ~30 us a
  // layer each way at bench-600m).
  phase.next("rope+core");
  const bool rope_fused = fused_rope();
  rope_ = rope_fused ? cuda::rope_tables(seq_, dr_, theta_) : cuda::RopeTables{};
  if (!rope_fused) {
    cuda::rope_forward(q_ + dn_, T, seq_, H, H * dq_, dq_, dr_, theta_, interleave_, r.stream);
    cuda::rope_forward(ckv_ + kv_lora_, T, seq_, 1, ckv_dim, dr_, dr_, theta_, interleave_, r.stream);
  }
  if (used_packed_) {
    cuda::attention_pack_mla_bf16(q_, kv.get(), ckv_, kv_lora_, packed_, batch_, seq_, H, dn_, dr_, dv_, r.stream,
                                  rope_fused ? &rope_ : nullptr);
    cuda::attention_forward_bf16_packed(packed_, attn_, lse_, batch_, seq_, H, dq_, dv_, scale_, r.stream);
  } else {
    mla_assemble_kv(kv.get(), ckv_, k_, v_, T, H, dn_, dv_, dr_, kv_lora_, r.stream);
    (tc ? cuda::attention_forward_bf16 : cuda::attention_forward)(q_, k_, v_, attn_, lse_, batch_, seq_, H, dq_, dv_,
                                                                   scale_, r.stream);
  }
  phase.next("o");
  cuda::linear_forward(lin, p, attn_, o_->value, y, T, hidden_, H * dv_, r.stream,
                       for_backward ? &attn_saved_ : nullptr);
  saved_ = true;
}

bool GpuMla::fused_rope() const {
  static const bool separate = env_switch("MOERL_ATTN_ROPE", "fused", "separate");
  return used_packed_ && interleave_ && dr_ > 0 && dn_ % 8 == 0 && !separate;
}

void GpuMla::backward(const float* dy, float* dx, const Run& r) {
  require(saved_, [&] {
    return "GpuModel: attention " + prefix_ + ": backward without a preceding forward (or called twice)";
  });
  require(dx != dy, [&] { return "GpuModel: attention " + prefix_ + ": backward's dx must not alias dy"; });
  saved_ = false;
  const Precision p = precision_;
  cuda::LinearContext& lin = *r.linear;
  const int64_t T = batch_ * seq_, H = heads_, ckv_dim = kv_lora_ + dr_;

  cuda_detail::PhaseSequence phase = sub_phases(p, "attn.bwd", r.stream);

  // o_proj.
  phase.next("o");
  Temp<float> d_attn(T * H * dv_, r);
  cuda::linear_backward(lin, p, dy, attn_, o_->value, d_attn.get(), o_->grad, T, hidden_, H * dv_, r.stream, false,
                        take_unset(*o_), &attn_saved_);

  // Attention core.
  phase.next("core+rope");
  Temp<float> d_q(T * H * dq_, r);
  Temp<float> d_ckv(T * ckv_dim, r);  // [dc | dk_rope]
  Temp<float> d_kv(T * H * (dn_ + dv_), r);
  // k_rope is shared by the heads, so its gradient is their sum (in head order). The packed backward writes d_kv
  // itself and dK's rope columns apart: one pass over dK and dV fewer (mla_split_dkv's 0.92 ms of bench-600m's fp8
  // step), 248.8-249.0k against 246.4-246.9k tokens/s on the H200, the same bits
  // (bench/results/2026-11-30-gpu-mla-dkv-h200-14d3983.txt).
  const bool rope_fused = fused_rope();  // as in the forward: dQ's and the rope key's rotations back fused too
  if (used_packed_ && dn_ % 8 == 0) {
    Temp<float> dk_rope(T * H * dr_, r);
    cuda::attention_backward_bf16_packed_mla(d_attn.get(), packed_, attn_, lse_, d_q.get(), d_kv.get(), dk_rope.get(),
                                             batch_, seq_, H, dn_, dr_, dv_, scale_, r.stream,
                                             rope_fused ? &rope_ : nullptr);
    mla_sum_rope_dk(dk_rope.get(), d_ckv.get(), T, H, dr_, kv_lora_, r.stream, rope_fused ? &rope_ : nullptr, seq_);
  } else {
    Temp<float> d_k(T * H * dq_, r), d_v(T * H * dv_, r);
    const bool tc = p != Precision::FP32 && cuda::attention_bf16_supported(dq_, dv_);
    if (used_packed_)
      cuda::attention_backward_bf16_packed(d_attn.get(), packed_, attn_, lse_, d_q.get(), d_k.get(), d_v.get(), batch_,
                                           seq_, H, dq_, dv_, scale_, r.stream);
    else
      (tc ? cuda::attention_backward_bf16 : cuda::attention_backward)(d_attn.get(), q_, k_, v_, attn_, lse_, d_q.get(),
                                                                      d_k.get(), d_v.get(), batch_, seq_, H, dq_, dv_,
                                                                      scale_, r.stream);
    mla_split_dkv(d_k.get(), d_v.get(), d_kv.get(), d_ckv.get(), T, H, dn_, dv_, dr_, kv_lora_, r.stream);
  }
  if (!rope_fused) {
    cuda::rope_backward(d_q.get() + dn_, T, seq_, H, H * dq_, dq_, dr_, theta_, interleave_, r.stream);
    cuda::rope_backward(d_ckv.get() + kv_lora_, T, seq_, 1, ckv_dim, dr_, dr_, theta_, interleave_, r.stream);
  }

  // kv_b_proj and kv_a_layernorm (its output and rstd recomputed from the saved latent).
  phase.next("kv_b");
  {
    Temp<float> normed(T * kv_lora_, r), rstd(T, r), d_normed(T * kv_lora_, r);
    cuda::rmsnorm_forward(ckv_, kv_a_norm_->value, normed.get(), rstd.get(), T, kv_lora_, eps_, r.stream, ckv_dim);
    cuda::linear_backward(lin, p, d_kv.get(), normed.get(), kv_b_->value, d_normed.get(), kv_b_->grad, T,
                          H * (dn_ + dv_), kv_lora_, r.stream, false, take_unset(*kv_b_));
    // dc straight into its columns of [dc | dk_rope].
    cuda::rmsnorm_backward(d_normed.get(), ckv_, kv_a_norm_->value, rstd.get(), d_ckv.get(), kv_a_norm_->grad, T,
                           kv_lora_, r.stream, nullptr, ckv_dim, ckv_dim, 0, take_unset(*kv_a_norm_));
  }

  // With q_lora: q_b_proj and q_a_layernorm, down to q_a's output gradient.
  phase.next("q");
  Temp<float> d_qa(q_lora_ > 0 ? T * q_lora_ : 0, r);
  if (q_lora_ > 0) {
    Temp<float> normed(T * q_lora_, r), rstd(T, r), d_normed(T * q_lora_, r);
    cuda::rmsnorm_forward(q_a_out_, q_a_norm_->value, normed.get(), rstd.get(), T, q_lora_, eps_, r.stream);
    cuda::linear_backward(lin, p, d_q.get(), normed.get(), q_b_->value, d_normed.get(), q_b_->grad, T, H * dq_,
                          q_lora_, r.stream, false, take_unset(*q_b_));
    cuda::rmsnorm_backward(d_normed.get(), q_a_out_, q_a_norm_->value, rstd.get(), d_qa.get(), q_a_norm_->grad, T,
                           q_lora_, r.stream, nullptr, 0, 0, 0, take_unset(*q_a_norm_));
  }

  // The projections of x: kv_a_proj_with_mqa writes dx, the query path's (q_a or q_proj) adds to it in its GEMM; x's
  // Wgrad operand made once for both.
  phase.next("kv_a+q");
  const bool kv_a_unset = take_unset(*kv_a_);
  const cuda::LinearGradient q_grad = q_lora_ > 0 ? cuda::LinearGradient{d_qa.get(), q_a_->value, q_a_->grad, q_lora_,
                                                                          take_unset(*q_a_)}
                                                  : cuda::LinearGradient{d_q.get(), q_proj_->value, q_proj_->grad,
                                                                          H * dq_, take_unset(*q_proj_)};
  cuda::linear_backward_shared(lin, p, x_,
                               {{d_ckv.get(), kv_a_->value, kv_a_->grad, ckv_dim, kv_a_unset}, q_grad}, dx, T,
                               hidden_, r.stream, false, &x_saved_);
}

}  // namespace moerl::gpu::detail
